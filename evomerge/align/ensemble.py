"""Output ensembles: the reference line every merge is compared with.

An ensemble runs every source model and averages their next-token *distributions*
(not logits): ``p(x) = mean_k softmax(logits_k)(x)``. :class:`EnsembleModel` wraps the
models behind the interface evaluators use (``model(input_ids, attention_mask,
labels=...)`` returning ``.logits`` and ``.loss``; greedy ``generate``), returning
``log p`` as its logits, so any evaluator scores an ensemble unchanged.
:class:`EnsembleEvaluator` wraps an evaluator the same way: ``evaluate`` takes the
list of models.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    >>> m = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 20, (1, 6))
    >>> ens = EnsembleModel([m, m])
    >>> torch.allclose(ens(ids).logits, torch.log_softmax(m(ids).logits, -1), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from transformers.modeling_outputs import CausalLMOutput


class EnsembleModel(torch.nn.Module):
    """Several causal LMs behind one forward: log of the mean of their distributions."""

    def __init__(self, models: Sequence[torch.nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(models)
        w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float32)
        self.register_buffer("log_weights", torch.log(w / w.sum()), persistent=False)
        self.config = getattr(models[0], "config", None)

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.members[0].parameters()).dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        kwargs.pop("use_cache", None)
        kwargs.pop("past_key_values", None)
        logps = [
            torch.log_softmax(m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits.float(), dim=-1)
            for m in self.members
        ]
        # log sum_k w_k p_k, computed stably in log space
        stacked = torch.stack(logps) + self.log_weights.to(logps[0].device)[:, None, None, None]
        logits = torch.logsumexp(stacked, dim=0)
        loss = None
        if labels is not None:  # the usual causal-LM loss: predict token t+1 from the prefix
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: Optional[int] = None,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        pad_token_id: Optional[int] = None,
        generation_config: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        """Greedy decoding, left padding allowed (no cache: ensembles are a reference line, not a server).

        Settings come from the arguments, else from ``generation_config`` (as
        transformers' ``generate`` takes them); sampling settings are ignored.
        """
        gc = generation_config
        max_new_tokens = max_new_tokens or getattr(gc, "max_new_tokens", None) or 20
        eos_token_id = eos_token_id if eos_token_id is not None else getattr(gc, "eos_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else getattr(gc, "pad_token_id", None)
        ids = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        pad = pad_token_id if pad_token_id is not None else (next(iter(eos)) if eos else 0)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: count real tokens only
            nxt = self(ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            done |= torch.tensor([int(t) in eos for t in nxt], device=ids.device)
            if bool(done.all()):
                break
        return ids


class EnsembleEvaluator:
    """Score the output ensemble of several models with any evaluator.

    ``evaluate(models, tokenizer)`` takes the list of models (they must share the
    tokenizer) and returns the wrapped evaluator's metrics for their ensemble.
    """

    def __init__(self, evaluator: Any, *, weights: Optional[Sequence[float]] = None, name: Optional[str] = None):
        self.inner = evaluator
        self.weights = weights
        self.name = name or f"ensemble_{getattr(evaluator, 'name', 'eval')}"
        self.metrics = dict(evaluator.metrics)

    def evaluate(self, models: Sequence[torch.nn.Module], tokenizer: Any, *, limit: Optional[Union[int, float]] = None) -> dict[str, float]:
        ens = EnsembleModel(list(models), self.weights).eval()
        scores = self.inner.evaluate(ens, tokenizer, limit=limit)
        bad = [k for k, v in scores.items() if not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"ensemble score {bad[0]} is not finite")
        return scores
