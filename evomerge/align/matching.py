"""Matching: the permutations of B that best line its units up with A's.

Each permutation group is a linear assignment problem on a unit similarity matrix
``S = alpha * S_weight + (1 - alpha) * S_activation`` (correlations, see
:mod:`evomerge.align.similarity`), solved exactly with
``scipy.optimize.linear_sum_assignment``:

- ``residual``: one assignment over hidden channels;
- ``mlp.L``: one assignment over the layer's MLP neurons;
- ``attn.L``: hierarchical. For every pair (key/value head g of A, head g' of B):
  the query heads of the two groups are matched on their q dimensions (which stay in
  place under rotary embeddings), then the value dimensions are matched on v rows
  pooled with the o_proj columns of the matched query heads; the pair's score is the
  k dimensions' similarity plus both assignments' values. A last assignment over
  these head scores matches the heads, and keeps the inner matches of the chosen pairs.

Weight similarities depend on the neighbouring groups' permutations, so the groups
are revisited in coordinate descent (residual, then attention and MLP of each layer)
until a full pass changes no permutation; ``patience`` passes without a better
summed assignment value, or ``max_passes``, end a search that cycles. With alpha 0
(activations only) nothing propagates, so the first pass is final. In weight
matching (alpha 1) the first residual estimate uses only the tensors no other
permutation touches (embeddings, head, norms): before the MLP and attention are
matched, their slices are scrambled noise that, in a wide model, outweighs the rest
and leads the descent astray (with activations, the residual's activation
similarity gives the start).

Example:
    >>> import torch
    >>> from evomerge._testing import llama_config
    >>> from evomerge.align.permutation import LlamaSpec, apply_permutations, random_permutations
    >>> spec = LlamaSpec.from_config(llama_config(layers=2))
    >>> a = {n: torch.randn(s) for n, s in spec.tensor_shapes().items()}
    >>> b = apply_permutations(a, spec, random_permutations(spec, torch.Generator().manual_seed(0)))
    >>> res = match_permutations(spec, a, b, alpha=1.0)
    >>> all(apply_permutations(b, spec, res.permutations)[n].equal(a[n]) for n in a)
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from evomerge.align import weights as W
from evomerge.align.permutation import AttentionPermutation, LlamaSpec, Permutations, identity_permutations
from evomerge.align.similarity import Activations, Moments, correlation, mix

State = Mapping[str, torch.Tensor]


@dataclass
class MatchResult:
    """Permutations that turn B into A's unit order, with how the search went."""

    permutations: Permutations
    passes: int
    converged: bool
    objective: list[float] = field(default_factory=list)  # summed assignment values after each pass


def assign(similarity: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Gather index p maximizing sum_i S[i, p[i]], and that sum."""
    s = similarity.detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long), float(s[rows, cols].sum())


def match_permutations(
    spec: LlamaSpec,
    a: State,
    b: State,
    *,
    alpha: float = 1.0,
    activations: Optional[Activations] = None,
    max_passes: int = 30,
    patience: int = 3,
    init: Optional[Permutations] = None,
    progress: Optional[Callable[[int, float, int], None]] = None,
) -> MatchResult:
    """Coordinate descent over the permutation groups of B (see module docstring).

    ``alpha`` = 1 is weight matching (no activations needed), 0 is activation
    matching; ``progress(pass, objective, changed_groups)`` is called after each pass.
    Stops when a pass changes no permutation (converged), or after ``patience``
    passes without a better objective (then the best pass's permutations are kept).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and activations is None:
        raise ValueError("alpha < 1 needs activation moments")
    use_w = alpha > 0.0
    perms = copy.deepcopy(init) if init is not None else identity_permutations(spec)
    act = activations or {}
    corr = lambda m: m.corr() if m is not None else None  # noqa: E731
    # Activation similarities do not depend on permutations: compute them once.
    act_corr = {k: m.corr() for k, m in act.items() if not (k.startswith("v.") or k.startswith("o."))} if alpha < 1 else {}
    history: list[float] = []
    best: Optional[tuple[float, Permutations]] = None
    stale = 0
    for n_pass in range(1, max_passes + 1):
        changed, total = 0, 0.0
        # weights alone: the first estimate, every other group still unmatched, trusts only
        # the anchors (with activations, their similarity is the anchor)
        first = n_pass == 1 and init is None and alpha >= 1.0
        sim = mix(corr(W.residual_moments(spec, a, b, perms, anchors_only=first)) if use_w else None, act_corr.get("residual"), alpha)
        p, value = assign(sim)
        changed += not p.equal(perms.residual)
        perms.residual, total = p, total + value
        for layer in range(spec.num_hidden_layers):
            wm = W.attention_moments(spec, a, b, perms, layer) if use_w else {}
            ap, value = _match_attention(spec, layer, wm, act if alpha < 1 else {}, act_corr, alpha)
            old = perms.attn[layer]
            changed += not (ap.kv.equal(old.kv) and ap.q.equal(old.q) and ap.v.equal(old.v))
            perms.attn[layer], total = ap, total + value
            sim = mix(corr(W.mlp_moments(spec, a, b, perms, layer)) if use_w else None, act_corr.get(f"mlp.{layer}"), alpha)
            p, value = assign(sim)
            changed += not p.equal(perms.mlp[layer])
            perms.mlp[layer], total = p, total + value
        history.append(total)
        if progress is not None:
            progress(n_pass, total, changed)
        if not changed or not use_w:  # activation similarities never change: one pass is final
            return MatchResult(perms, n_pass, True, history)
        if best is None or total > best[0] + 1e-9 * abs(best[0]):
            best, stale = (total, copy.deepcopy(perms)), 0
        else:
            stale += 1
            if stale >= patience:  # cycling without improving: keep the best pass
                break
    assert best is not None
    return MatchResult(best[1], len(history), False, history)


def _match_attention(
    spec: LlamaSpec,
    layer: int,
    wm: Mapping[str, Moments],
    act: Activations,
    act_corr: Mapping[str, torch.Tensor],
    alpha: float,
) -> tuple[AttentionPermutation, float]:
    """Heads from head-level scores, then query heads and value dims inside matched heads."""
    nkv, rep, d = spec.num_key_value_heads, spec.n_rep, spec.head_dim

    def unit_sim(key: str) -> torch.Tensor:
        w = wm[key].corr() if key in wm else None
        return mix(w, act_corr.get(f"{key}.{layer}"), alpha)

    # q/k dimensions are fixed inside a head: only same-index dims are compared.
    sq = unit_sim("q").reshape(nkv, rep, d, nkv, rep, d).diagonal(dim1=2, dim2=5).sum(-1)  # [g, r, g', r']
    sk = unit_sim("k").reshape(nkv, d, nkv, d).diagonal(dim1=1, dim2=3).sum(-1)  # [g, g']
    sides = [(wm.get("v"), wm.get("o"), alpha), (act.get(f"v.{layer}"), act.get(f"o.{layer}"), 1.0 - alpha)]
    sides = [(v, o, f) for v, o, f in sides if f > 0 and v is not None]
    head_score = torch.zeros(nkv, nkv, dtype=torch.float64)
    inner: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for g in range(nkv):
        for h in range(nkv):
            tau, q_val = assign(sq[g, :, h, :])
            sv = sum(f * _value_dim_corr(v, o, g, h, tau, spec) for v, o, f in sides)
            rho, v_val = assign(sv)
            head_score[g, h] = float(sk[g, h]) + q_val + v_val
            inner[g, h] = tau, rho
    kv, value = assign(head_score)
    q = torch.stack([inner[g, int(kv[g])][0] for g in range(nkv)])
    v = torch.stack([inner[g, int(kv[g])][1] for g in range(nkv)])
    return AttentionPermutation(kv, q, v), value


def _value_dim_corr(v: Moments, o: Moments, g: int, h: int, tau: torch.Tensor, spec: LlamaSpec) -> torch.Tensor:
    """[d, d] correlation of A's value dims of head g with B's of head h.

    A value dimension's vector is its v row (or v output) followed by the o_proj
    column (or o input) of each query head of its group, B's query heads taken in
    the order ``tau`` matched them.
    """
    nkv, rep, d = spec.num_key_value_heads, spec.n_rep, spec.head_dim
    vs = lambda t, k: t.reshape(nkv, d)[k]  # noqa: E731
    os_ = lambda t, k: t.reshape(nkv, rep, d)[k].sum(0)  # noqa: E731
    sab = v.sab.reshape(nkv, d, nkv, d)[g, :, h, :].clone()
    o_ab = o.sab.reshape(nkv, rep, d, nkv, rep, d)[g, :, :, h, :, :]  # [r, e, r', e']
    sab += o_ab[torch.arange(rep), :, tau, :].sum(0)
    return correlation(
        v.n + rep * o.n,
        vs(v.sa, g) + os_(o.sa, g),
        vs(v.sb, h) + os_(o.sb, h),
        vs(v.saa, g) + os_(o.saa, g),
        vs(v.sbb, h) + os_(o.sbb, h),
        sab,
    )
