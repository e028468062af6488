"""Endpoints of an alignment: a model folder, a SourceModel or a live transformers model.

:class:`Endpoint` gives the three things alignment needs from a model, each loaded
only when asked: its config, its state dict (tensors in their stored dtype; a
safetensors folder is memory-mapped) and a runnable float32 module (for
activations and scoring). Also: the compatibility check that must pass before two
models are aligned, and the small tensor helpers shared by ``interpolate``.

Example:
    >>> import transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    >>> a = Endpoint.load(transformers.LlamaForCausalLM(cfg))
    >>> check_alignable(a, a).num_key_value_heads
    1
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from evomerge.align.permutation import SHAPE_FIELDS, LlamaSpec, tensor_role
from evomerge.errors import SourceError
from evomerge.sources import SourceModel

ModelRef = Union[str, Path, SourceModel, torch.nn.Module, "Endpoint"]


@dataclass
class Endpoint:
    """One model to align or interpolate."""

    ref: str
    config: dict
    path: Optional[Path] = None
    source: Optional[SourceModel] = None
    _module: Optional[torch.nn.Module] = field(default=None, repr=False)
    _state: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, model: ModelRef, *, allow_pickle: bool = False) -> "Endpoint":
        if isinstance(model, Endpoint):
            return model
        if isinstance(model, torch.nn.Module):
            cfg = model.config.to_dict() if hasattr(model, "config") else {}
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            return cls(ref=str(name), config=cfg, _module=model)
        src = model if isinstance(model, SourceModel) else SourceModel.open(str(model), allow_pickle=allow_pickle)
        return cls(ref=src.ref, config=dict(src.config), path=src.path, source=src)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Tensor name -> tensor, in its stored dtype (not copied)."""
        if self._state is None:
            if self.source is not None:
                self._state = {n: self.source.tensor(n) for n in self.source.tensor_names}
            else:
                assert self._module is not None
                self._state = {n: t.detach() for n, t in self._module.state_dict().items()}
        return self._state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.source is not None:
            return {n: self.source.shape(n) for n in self.source.tensor_names}
        return {n: tuple(t.shape) for n, t in self.state.items()}

    def module(self) -> torch.nn.Module:
        """A float32 transformers model in eval mode (loaded once)."""
        if self._module is None:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            assert self.path is not None
            hf_logging.disable_progress_bar()  # as `evaluate` does: our own lines say what is loading
            self._module = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        return self._module

    def tokenizer(self) -> Any:
        """The folder's tokenizer, or None when it has none."""
        if self._tokenizer is None and self.path is not None and self.source is not None and self.source.tokenizer_files():
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def scratch(self) -> torch.nn.Module:
        """A private copy of the module, for loading blended weights into."""
        return copy.deepcopy(self.module())


def check_alignable(a: Endpoint, b: Endpoint, *, doing: Optional[str] = None) -> LlamaSpec:
    """The shared structure of two models, or SourceError naming the first mismatch.

    ``doing`` opens the message (default: ``cannot align B to A``).
    """
    spec_a = LlamaSpec.from_config(a.config, where=a.ref)
    spec_b = LlamaSpec.from_config(b.config, where=b.ref)
    pre = doing or f"cannot align {b.ref} to {a.ref}"
    arch = lambda e: (e.config.get("architectures") or [e.config.get("model_type")])[0]  # noqa: E731
    if arch(a) != arch(b):
        raise SourceError(f"{pre}: architecture differs ({a.ref} is {arch(a)}, {b.ref} is {arch(b)})")
    for name in SHAPE_FIELDS + ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        va, vb = getattr(spec_a, name), getattr(spec_b, name)
        if va != vb:
            raise SourceError(f"{pre}: {name} differs ({a.ref} has {va}, {b.ref} has {vb})")
    expected = spec_a.tensor_shapes()
    sa, sb = a.shapes(), b.shapes()
    for name, shape in sa.items():
        tensor_role(name)  # a tensor outside the Llama layout cannot be placed
        if tuple(shape) != expected.get(name):
            raise SourceError(f"{pre}: tensor {name} of {a.ref} has shape {list(shape)}, its config implies {list(expected.get(name, ()))}")
        if name not in sb:
            raise SourceError(f"{pre}: tensor {name} is in {a.ref} but missing from {b.ref}")
        if tuple(sb[name]) != tuple(shape):
            raise SourceError(f"{pre}: shape differs at tensor {name} ({a.ref} has {list(shape)}, {b.ref} has {list(sb[name])})")
    extra = [n for n in sb if n not in sa]
    if extra:
        raise SourceError(f"{pre}: tensor {extra[0]} is in {b.ref} but missing from {a.ref}")
    return spec_a


def blend(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """The point ``(1 - t) * a + t * b`` of the straight path, in float32."""
    return {n: torch.lerp(a[n].float(), b[n].float(), t) for n in a}


@torch.no_grad()
def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into a live model by name (tied weights are written once, either name)."""
    params = module.state_dict(keep_vars=True)
    missing = [n for n in params if n not in state and not (n == "lm_head.weight" and "model.embed_tokens.weight" in state)]
    if missing:
        raise SourceError(f"no tensor {missing[0]} to load into the model")
    for name, p in params.items():
        if name in state:
            p.copy_(state[name].to(p.dtype))
