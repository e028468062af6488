"""A self-contained evaluator: next-token loss and accuracy on token batches.

It needs nothing but data, so alignment can pick its balance factor, and
``interpolate`` can trace the loss along a path, when no evaluator preset is at
hand (a ``.jsonl``/text file given as ``--evaluator`` becomes one of these). It
follows the evaluator protocol: ``name``, ``metrics`` (name -> direction) and
``evaluate(model, tokenizer, *, limit=None) -> dict``.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> ev = LMLossEvaluator(torch.randint(3, 20, (4, 12)))
    >>> sorted(ev.evaluate(model, None))
    ['loss', 'token_accuracy']
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from evomerge.align.data import Batch, is_batches, token_batches
from evomerge.config import check_limit


def next_token_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, keep): the next token at each position, and which positions count.

    With ``labels`` only the labelled positions count (-100: prompt, padding), else
    every real token.

    >>> t, k = next_token_targets({"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    >>> t.tolist(), k.tolist()
    ([[6, 7, 0]], [[True, True, False]])
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if "labels" in batch:
        target = batch["labels"][:, 1:]
        return target.clamp_min(0), target != -100
    target = ids[:, 1:]
    return target, (mask[:, 1:] if mask is not None else torch.ones_like(target)).bool()


class LMLossEvaluator:
    """Mean next-token cross-entropy (nats) and top-1 accuracy over the non-padding tokens.

    Batches may carry ``labels`` (-100 where a position does not count, as in
    transformers): then only the labelled tokens are scored, e.g. answers, not prompts.
    """

    metrics = {"loss": "minimize", "token_accuracy": "maximize"}

    def __init__(self, data: Any, *, name: str = "lm", batch_size: int = 8, max_length: int = 128, max_examples: Optional[int] = 256):
        self.name = name
        self._data = data
        self._options = dict(batch_size=batch_size, max_length=max_length, max_examples=max_examples)
        self._batches: Optional[list[Batch]] = None
        if is_batches(data):
            self._batches = list(data)

    @property
    def tokenized(self) -> bool:
        """True when the data are token batches already (no tokenizer needed)."""
        return self._batches is not None

    def batches(self, tokenizer: Any = None) -> list[Batch]:
        if self._batches is None:
            self._batches = token_batches(self._data, tokenizer, **self._options)
        return self._batches

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[Union[int, float]] = None) -> dict[str, float]:
        batches = self.batches(tokenizer)
        if limit is not None:  # the first examples: a count (an int) or a fraction of them (a float, 1.0 = all)
            limit = check_limit(limit)
            total = sum(len(b["input_ids"]) for b in batches)
            left = limit if isinstance(limit, int) else max(1, math.ceil(limit * total))
            cut = []
            for b in batches:
                if left <= 0:
                    break
                cut.append({k: v[:left] for k, v in b.items()})
                left -= len(b["input_ids"])
            batches = cut
        nll, correct, count = 0.0, 0, 0
        was_training = getattr(model, "training", False)
        model.eval()
        for b in batches:
            ids, mask = b["input_ids"], b.get("attention_mask")
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = next_token_targets(b)
            logp = torch.log_softmax(logits, dim=-1)
            tok = logp.gather(-1, target[..., None])[..., 0]
            nll -= float(tok[keep].sum())
            correct += int((logits.argmax(-1) == target)[keep].sum())
            count += int(keep.sum())
        if was_training:
            model.train()
        if count == 0:
            raise ValueError("no tokens to score")
        return {"loss": nll / count, "token_accuracy": correct / count}
