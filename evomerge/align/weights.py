"""Weight-space unit vectors of each permutation group, as pooled moments.

The vector of a unit is every slice of every tensor that touches it: for a residual
channel its embedding column, its norm weights, its column in q/k/v/gate/up/head and
its row in o/down; for an MLP neuron its rows of gate and up and its column of down;
for a query/key/value dimension its row of q/k/v (with its bias); for an o_proj input
its column. The other model's slices are read with every *other* group's current
permutation applied (the neighbours' permutations propagate into this group's
similarity, as in Git Re-Basin weight matching), its own group left in place.

Example:
    >>> import torch
    >>> from evomerge._testing import llama_config
    >>> from evomerge.align.permutation import LlamaSpec, identity_permutations
    >>> spec = LlamaSpec.from_config(llama_config(layers=1))
    >>> state = {n: torch.randn(s) for n, s in spec.tensor_shapes().items()}
    >>> m = residual_moments(spec, state, state, identity_permutations(spec))
    >>> bool((m.corr().diagonal() > 0.999).all())
    True
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch

from evomerge.align.permutation import LlamaSpec, Permutations, permute_tensor, tensor_role
from evomerge.align.similarity import Moments, add

State = Mapping[str, torch.Tensor]


def _without(perms: Permutations, spec: LlamaSpec, group: tuple) -> Permutations:
    """``perms`` with one group reset to identity (shallow copy; lists copied)."""
    p = copy.copy(perms)
    p.mlp, p.attn = list(perms.mlp), list(perms.attn)
    kind = group[0]
    if kind == "residual":
        p.residual = torch.arange(spec.hidden_size)
    elif kind == "mlp":
        p.mlp[group[1]] = torch.arange(spec.intermediate_size)
    else:
        from evomerge.align.permutation import identity_permutations

        p.attn[group[1]] = identity_permutations(spec).attn[0]
    return p


# Tensors whose only permuted axis is the residual stream: embeddings, head, norms,
# and the biases added to the stream.
_ANCHORS = ("embed", "head", "norm", "o_bias", "out_bias")


def residual_moments(spec: LlamaSpec, a: State, b: State, perms: Permutations, *, anchors_only: bool = False) -> Moments:
    """[hidden, hidden] moments of residual channels over every tensor that touches them.

    ``anchors_only``: only the tensors no other permutation touches (embeddings, head,
    norms), for a first estimate made before the other groups are matched, which
    the still-scrambled MLP and attention slices would otherwise drown.
    """
    p = _without(perms, spec, ("residual",))
    total = None
    for name, ta in a.items():
        role, _ = tensor_role(name)
        if role.endswith("_bias") and role not in ("o_bias", "out_bias"):
            continue  # q/k/v/gate/up biases live on the other side of the projection
        if anchors_only and role not in _ANCHORS:
            continue
        tb = permute_tensor(name, b[name], spec, p)
        if ta.dim() == 1:
            total = add(total, Moments.of(ta[:, None], tb[:, None]))
        elif role in ("o", "down"):
            total = add(total, Moments.of(ta, tb))  # rows write the residual stream
        else:
            total = add(total, Moments.of(ta.T, tb.T))  # columns read it
    assert total is not None
    return total


def mlp_moments(spec: LlamaSpec, a: State, b: State, perms: Permutations, layer: int) -> Moments:
    """[intermediate, intermediate] moments of one layer's MLP neurons."""
    p = _without(perms, spec, ("mlp", layer))
    pre = f"model.layers.{layer}.mlp."
    total = None
    for proj in ("gate_proj", "up_proj"):
        for kind in ("weight", "bias"):
            name = f"{pre}{proj}.{kind}"
            if name in a:
                ta, tb = a[name], permute_tensor(name, b[name], spec, p)
                total = add(total, Moments.of(ta.reshape(ta.shape[0], -1), tb.reshape(tb.shape[0], -1)))
    name = pre + "down_proj.weight"
    total = add(total, Moments.of(a[name].T, permute_tensor(name, b[name], spec, p).T))
    assert total is not None
    return total


def attention_moments(spec: LlamaSpec, a: State, b: State, perms: Permutations, layer: int) -> dict[str, Moments]:
    """Moments of one layer's q, k and v rows (bias included) and o_proj columns.

    Keys ``q`` and ``o`` are over [n_heads * head_dim] units, ``k`` and ``v`` over
    [n_kv_heads * head_dim]; :mod:`evomerge.align.matching` groups them into heads.
    """
    p = _without(perms, spec, ("attn", layer))
    pre = f"model.layers.{layer}.self_attn."
    out: dict[str, Moments] = {}
    for key in ("q", "k", "v"):
        name = f"{pre}{key}_proj.weight"
        m = Moments.of(a[name], permute_tensor(name, b[name], spec, p))
        bias = f"{pre}{key}_proj.bias"
        if bias in a:
            m = m + Moments.of(a[bias][:, None], permute_tensor(bias, b[bias], spec, p)[:, None])
        out[key] = m
    name = pre + "o_proj.weight"
    out["o"] = Moments.of(a[name].T, permute_tensor(name, b[name], spec, p).T)
    return out
