"""The permutation symmetries of a Llama-family model, and applying them to a state dict.

Relabelling hidden units changes no output when every tensor that reads or writes
those units is relabelled the same way. A decoder-only Llama has five kinds:

``residual``
    one permutation of the residual stream, shared by the embeddings (columns), every
    RMSNorm weight (RMSNorm's mean of squares ignores the order), the inputs of
    q/k/v/gate/up (columns), the outputs of o/down (rows, and their biases) and the
    head (columns; a tied head is the embedding itself).
``mlp``
    per layer, one permutation of the MLP hidden units: rows of gate and up, columns
    of down.
``kv_heads``
    per layer, a permutation of key/value heads that carries each head's group of
    query heads with it (under GQA query head ``h`` reads key/value head
    ``h // n_rep``): rows of q/k/v in head blocks, columns of o.
``q_in_group``
    per layer and key/value head, a permutation of the query heads inside its group
    (they all read the same key/value head): rows of q, columns of o.
``v_dims``
    per layer and key/value head, a permutation of the value dimensions: rows of v
    inside the head block, and the same columns of o for every query head of the
    group. The q/k dimensions stay in place: rotary embeddings tie each dimension
    pair to its own frequency.

Every permutation is stored in *gather* form: ``new[i] = old[p[i]]`` along its axis.

Example:
    >>> import torch
    >>> from evomerge._testing import llama_config
    >>> spec = LlamaSpec.from_config(llama_config(heads=4, kv_heads=2))
    >>> perms = random_permutations(spec, torch.Generator().manual_seed(0))
    >>> state = {n: torch.randn(s) for n, s in spec.tensor_shapes().items()}
    >>> moved = apply_permutations(state, spec, perms)
    >>> moved["model.norm.weight"].sort().values.equal(state["model.norm.weight"].sort().values)
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

from evomerge.errors import SourceError

KINDS = ("residual", "mlp", "kv_heads", "q_in_group", "v_dims")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")

_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# role of each tensor inside a decoder layer
_LAYER_ROLES = {
    "input_layernorm.weight": "norm",
    "post_attention_layernorm.weight": "norm",
    "self_attn.q_proj.weight": "q",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.weight": "k",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.weight": "v",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.weight": "o",
    "self_attn.o_proj.bias": "o_bias",
    "mlp.gate_proj.weight": "in_mlp",
    "mlp.up_proj.weight": "in_mlp",
    "mlp.gate_proj.bias": "in_mlp_bias",
    "mlp.up_proj.bias": "in_mlp_bias",
    "mlp.down_proj.weight": "down",
    "mlp.down_proj.bias": "out_bias",
}
_GLOBAL_ROLES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "head",
}
# what must agree before two models can be aligned, in the order it is checked
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True)
class LlamaSpec:
    """The sizes that fix a Llama model's permutation structure."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config: Mapping, *, where: str = "model") -> "LlamaSpec":
        """Read a Hugging Face config dict; refuses models outside the Llama family."""
        model_type = str(config.get("model_type", ""))
        if model_type not in LLAMA_FAMILY:
            raise SourceError(
                f"{where}: alignment supports the Llama family ({', '.join(LLAMA_FAMILY)}); this is model_type {model_type or 'unknown'!r}"
            )
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            spec = cls(
                hidden_size=hidden,
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(config.get("mlp_bias", False)),
                model_type=model_type,
            )
        except KeyError as exc:
            raise SourceError(f"{where}: config.json has no {exc.args[0]}") from None
        if spec.num_attention_heads % spec.num_key_value_heads:
            raise SourceError(f"{where}: {heads} attention heads do not split into {spec.num_key_value_heads} key/value groups")
        return spec

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model (with the head even when tied) and its shape."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, q),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                }
            )
            if self.attention_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)})
                if self.model_type == "llama":  # Llama's attention_bias covers o_proj too; Qwen2's q/k/v biases do not
                    shapes[p + "self_attn.o_proj.bias"] = (h,)
            if self.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)})
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


def tensor_role(name: str) -> tuple[str, Optional[int]]:
    """(role, layer) of a tensor name; SourceError for a tensor outside the Llama layout."""
    if name in _GLOBAL_ROLES:
        return _GLOBAL_ROLES[name], None
    m = _LAYER_TENSOR.match(name)
    if m and m.group(2) in _LAYER_ROLES:
        return _LAYER_ROLES[m.group(2)], int(m.group(1))
    raise SourceError(f"tensor {name} is not part of the Llama layout; alignment cannot place it")


@dataclass
class AttentionPermutation:
    """One layer's attention permutation, in gather form.

    New key/value head ``g`` is old head ``kv[g]``; new query head ``(g, r)`` (slot
    ``r`` of group ``g``) is old query head ``(kv[g], q[g, r])``; new value dimension
    ``(g, e)`` is old dimension ``(kv[g], v[g, e])``.
    """

    kv: torch.Tensor  # [n_kv]
    q: torch.Tensor  # [n_kv, n_rep]
    v: torch.Tensor  # [n_kv, head_dim]

    def query_heads(self) -> torch.Tensor:
        """Gather index over query heads: new head g*n_rep + r <- old head."""
        n_rep = self.q.shape[1]
        return (self.kv[:, None] * n_rep + self.q).reshape(-1)

    def q_rows(self, head_dim: int) -> torch.Tensor:
        """Gather index over q_proj rows (dimensions inside a head stay in place)."""
        return (self.query_heads()[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

    def k_rows(self, head_dim: int) -> torch.Tensor:
        return (self.kv[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

    def v_rows(self) -> torch.Tensor:
        d = self.v.shape[1]
        return (self.kv[:, None] * d + self.v).reshape(-1)

    def o_columns(self) -> torch.Tensor:
        """Gather index over o_proj columns: query-head blocks, value dims of their group."""
        d, n_rep = self.v.shape[1], self.q.shape[1]
        dims = self.v.repeat_interleave(n_rep, dim=0)  # [n_heads, d]: each query head uses its group's dims
        return (self.query_heads()[:, None] * d + dims).reshape(-1)


@dataclass
class Permutations:
    """All permutations of one model: residual, per-layer MLP and attention."""

    residual: torch.Tensor
    mlp: list[torch.Tensor] = field(default_factory=list)
    attn: list[AttentionPermutation] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "residual": self.residual.tolist(),
            "mlp": [p.tolist() for p in self.mlp],
            "attn": [{"kv": a.kv.tolist(), "q": a.q.tolist(), "v": a.v.tolist()} for a in self.attn],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "Permutations":
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls(t(data["residual"]), [t(p) for p in data["mlp"]], [AttentionPermutation(t(a["kv"]), t(a["q"]), t(a["v"])) for a in data["attn"]])

    def equal(self, other: "Permutations") -> bool:
        return (
            self.residual.equal(other.residual)
            and all(a.equal(b) for a, b in zip(self.mlp, other.mlp))
            and all(a.kv.equal(b.kv) and a.q.equal(b.q) and a.v.equal(b.v) for a, b in zip(self.attn, other.attn))
        )


def identity_permutations(spec: LlamaSpec) -> Permutations:
    """The permutations that change nothing."""
    ar = torch.arange
    nkv, d = spec.num_key_value_heads, spec.head_dim
    return Permutations(
        residual=ar(spec.hidden_size),
        mlp=[ar(spec.intermediate_size) for _ in range(spec.num_hidden_layers)],
        attn=[
            AttentionPermutation(ar(nkv), ar(spec.n_rep).repeat(nkv, 1), ar(d).repeat(nkv, 1))
            for _ in range(spec.num_hidden_layers)
        ],
    )


def random_permutations(spec: LlamaSpec, generator: torch.Generator, kinds: Iterable[str] = KINDS) -> Permutations:
    """Random permutations of the given kinds (the others stay identity)."""
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown permutation kind {sorted(unknown)[0]!r} (known: {', '.join(KINDS)})")
    rp = lambda n: torch.randperm(n, generator=generator)  # noqa: E731
    perms = identity_permutations(spec)
    if "residual" in kinds:
        perms.residual = rp(spec.hidden_size)
    for n in range(spec.num_hidden_layers):
        if "mlp" in kinds:
            perms.mlp[n] = rp(spec.intermediate_size)
        a = perms.attn[n]
        if "kv_heads" in kinds:
            a.kv = rp(spec.num_key_value_heads)
        if "q_in_group" in kinds:
            a.q = torch.stack([rp(spec.n_rep) for _ in range(spec.num_key_value_heads)])
        if "v_dims" in kinds:
            a.v = torch.stack([rp(spec.head_dim) for _ in range(spec.num_key_value_heads)])
    return perms


def permute_tensor(name: str, tensor: torch.Tensor, spec: LlamaSpec, perms: Permutations) -> torch.Tensor:
    """One tensor of the model with ``perms`` applied (a new tensor; the input is untouched)."""
    role, layer = tensor_role(name)
    res = perms.residual
    if role == "embed" or role == "head":
        return tensor[:, res]
    if role == "norm" or role == "out_bias" or role == "o_bias":
        return tensor[res]
    assert layer is not None
    a, mlp = perms.attn[layer], perms.mlp[layer]
    d = spec.head_dim
    rows = {
        "q": a.q_rows(d), "q_bias": a.q_rows(d),
        "k": a.k_rows(d), "k_bias": a.k_rows(d),
        "v": a.v_rows(), "v_bias": a.v_rows(),
        "in_mlp": mlp, "in_mlp_bias": mlp,
    }
    if role in rows:
        t = tensor[rows[role]]
        return t[:, res] if t.dim() == 2 else t
    if role == "o":
        return tensor[res][:, a.o_columns()]
    if role == "down":
        return tensor[res][:, mlp]
    raise AssertionError(role)  # every role of tensor_role is handled above


def apply_permutations(state: Mapping[str, torch.Tensor], spec: LlamaSpec, perms: Permutations) -> dict[str, torch.Tensor]:
    """A new state dict with ``perms`` applied to every tensor; outputs stay the same."""
    return {name: permute_tensor(name, t, spec, perms) for name, t in state.items()}
