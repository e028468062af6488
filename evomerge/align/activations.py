"""Activation-space unit vectors: hooks on two models run over the same token batches.

For every permutation group the hooks record what its units carry:

========  =============================================  =======================
key       activation                                     units
========  =============================================  =======================
residual  hidden states after the embedding and every    hidden_size
          layer (output_hidden_states); the mean of
          the sites' correlations (``MeanOfSites``)
mlp.L     input of down_proj (act(gate) * up)            intermediate_size
q.L       output of q_proj (before rotary)               n_heads * head_dim
k.L       output of k_proj                               n_kv_heads * head_dim
v.L       output of v_proj                               n_kv_heads * head_dim
o.L       input of o_proj (attention output per head)    n_heads * head_dim
========  =============================================  =======================

Only the moments of each pair of unit sets are kept (:class:`~evomerge.align.similarity.Moments`,
float64), never the activations, so memory is a few [units, units] matrices whatever
the dataset size. Padding positions are left out.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    >>> m = transformers.LlamaForCausalLM(cfg).eval()
    >>> stats = activation_moments(m, m, [{"input_ids": torch.randint(0, 20, (2, 8))}])
    >>> sorted(stats)[:3], float(stats["residual"].corr().diagonal().min()) > 0.999
    (['k.0', 'mlp.0', 'o.0'], True)
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch

from evomerge.align.similarity import Activations, MeanOfSites, Moments

Batch = Mapping[str, torch.Tensor]


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    return list(inner.layers)


@torch.no_grad()
def record(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """One forward pass; returns [units, tokens] activations per key (padding dropped)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def out_hook(key: str):
        return lambda _m, _i, out: captured.__setitem__(key, out)

    def in_hook(key: str):
        return lambda _m, args: captured.__setitem__(key, args[0])

    for n, layer in enumerate(_layers(model)):
        att = layer.self_attn
        for key in ("q", "k", "v"):
            handles.append(getattr(att, f"{key}_proj").register_forward_hook(out_hook(f"{key}.{n}")))
        handles.append(att.o_proj.register_forward_pre_hook(in_hook(f"o.{n}")))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(in_hook(f"mlp.{n}")))
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    try:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    keep = (mask if mask is not None else torch.ones_like(ids)).reshape(-1).bool()

    def units(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[keep].T.float()

    acts = {k: units(v) for k, v in captured.items()}
    for site, h in enumerate(out.hidden_states):
        acts[f"residual.{site}"] = units(h)
    return acts


def activation_moments(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    max_tokens: Optional[int] = None,
) -> Activations:
    """Moments of every unit set of A against the same set of B, over the batches."""
    model_a.eval()
    model_b.eval()
    total: dict[str, Moments] = {}
    seen = 0
    for batch in batches:
        acts_a, acts_b = record(model_a, batch), record(model_b, batch)
        for key, a in acts_a.items():
            m = Moments.of(a, acts_b[key])
            total[key] = total[key] + m if key in total else m
        seen += int(acts_a["mlp.0"].shape[1]) if "mlp.0" in acts_a else 0
        if max_tokens is not None and seen >= max_tokens:
            break
    if not total:
        raise ValueError("no batches to collect activations from")
    sites = sorted((k for k in total if k.startswith("residual.")), key=lambda k: int(k.split(".")[1]))
    out: Activations = {k: v for k, v in total.items() if not k.startswith("residual.")}
    out["residual"] = MeanOfSites([total[k] for k in sites])
    return out
