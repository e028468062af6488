"""A routed model: a layer stack run by reference to the sources' own modules.

:class:`Router` turns a ``slices:`` recipe into a live causal LM without copying a
weight: a shell of the sources' class (built once on the meta device, so it holds no
weight of its own) whose ``model.layers`` is a new ``ModuleList`` of
:class:`RoutedLayer` wrappers around the sources' decoder layers, whose embeddings are
the first slot model's and whose final norm and head are the last slot model's (as the
exported folder has them). A module may fill several slots: at call time its wrapper
sets the attention's ``layer_idx`` to the slot (each slot gets its own KV-cache entry;
the cache and the causal mask follow the shell's ``num_hidden_layers``, set to the new
depth) and the slot's branch ``scale``, applied by forward hooks on ``o_proj`` and
``down_proj`` as the exported recipe scales those weights. Routing a candidate builds
a few small Python objects: no tensor is allocated.

Example:
    >>> router = Router({"a": model_a, "b": model_b})      # doctest: +SKIP
    >>> live = router.route(slice_recipe)                   # doctest: +SKIP
    >>> live(input_ids).logits                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch
from torch import nn

from evomerge.errors import MergeError
from evomerge.merge.slices import SliceRecipe

#: the branch outputs a slot's ``scale`` multiplies (what the exported recipe's filters name)
SCALED = ("o_proj", "down_proj")
_SCALE_ATTR = "_evomerge_scale"


def _scale_hook(module: nn.Module, args: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
    scale = getattr(module, _SCALE_ATTR, None)
    return None if scale is None else output * scale


class RoutedLayer(nn.Module):
    """One slot: a source's decoder layer (by reference) run as layer ``slot``."""

    def __init__(self, layer: nn.Module, slot: int, scale: Optional[float] = None):
        super().__init__()
        self.layer, self.slot, self.scale = layer, slot, scale
        self._branches = [m for name, m in layer.named_modules() if name.rsplit(".", 1)[-1] in SCALED]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        attn = self.layer.self_attn
        saved = attn.layer_idx
        attn.layer_idx = self.slot
        if self.scale is not None:
            for m in self._branches:
                setattr(m, _SCALE_ATTR, self.scale)
        try:
            return self.layer(*args, **kwargs)
        finally:
            attn.layer_idx = saved
            if self.scale is not None:
                for m in self._branches:
                    setattr(m, _SCALE_ATTR, None)

    def __getattr__(self, name: str) -> Any:  # e.g. attention_type, read by some models' loops
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


class Router:
    """Routes layer stacks through loaded source models (``ref -> PreTrainedModel``,
    Llama-style: ``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head``)."""

    def __init__(self, models: Mapping[str, nn.Module]):
        if not models:
            raise MergeError("a router needs at least one source model")
        self.models = dict(models)
        self._hooked: set[int] = set()
        self._wrappers: dict[tuple[str, int, int], RoutedLayer] = {}
        first = next(iter(self.models.values()))
        config = copy.deepcopy(first.config)
        config.num_hidden_layers = 0
        with torch.device("meta"):
            self.shell = type(first)(config)  # no weight of its own: every module is replaced per route
        self.shell.model.rotary_emb = first.model.rotary_emb
        self.shell.generation_config = copy.deepcopy(first.generation_config)
        self.shell.eval()
        for m in self.models.values():
            self._hook(m)

    def add(self, ref: str, model: nn.Module) -> None:
        """Route through one more model (a chain's live parameter merge, say)."""
        self.models[ref] = model
        self._wrappers = {k: w for k, w in self._wrappers.items() if k[0] != ref}  # they wrap the old model's layers
        self._hook(model)

    def _hook(self, model: nn.Module) -> None:
        for layer in model.model.layers:
            for name, m in layer.named_modules():
                if name.rsplit(".", 1)[-1] in SCALED and id(m) not in self._hooked:
                    m.register_forward_hook(_scale_hook)
                    self._hooked.add(id(m))

    def _model(self, ref: str) -> nn.Module:
        try:
            return self.models[ref]
        except KeyError:
            raise MergeError(f"the layer stack names model {ref}, which this router was not given") from None

    def route(self, recipe: SliceRecipe) -> nn.Module:
        """The live model of ``recipe`` (the shell, re-pointed: one routed model at a time)."""
        recipe.check_depths({ref: len(m.model.layers) for ref, m in self.models.items()})
        if any(recipe.outside_scale(n, last=last) is not None for n, last in
               (("model.embed_tokens.weight", False), ("model.norm.weight", True), ("lm_head.weight", True))):
            raise MergeError("a routed model scales layer branches only (o_proj, down_proj), not embeddings, norm or head")
        wrappers = []
        for slot in recipe.slots():
            layer = self._model(slot.model).model.layers[slot.layer]
            scale = None
            if slot.scaled:  # filters are resolved only where a scale is set
                scales = {slot.scale(f"x.{s}.weight") for s in SCALED}
                if len(scales) > 1 or any(slot.scale(n) is not None for n, _ in layer.named_parameters(prefix="x")
                                          if not any(s in n for s in SCALED)):
                    raise MergeError(f"layer {slot.index}: a routed layer scales o_proj and down_proj alike, and nothing else")
                scale = scales.pop()
            key = (slot.model, slot.layer, slot.index)  # a wrapper per (layer, slot), made once: routing stays under a millisecond
            wrapper = self._wrappers.get(key)
            if wrapper is None:
                wrapper = self._wrappers[key] = RoutedLayer(layer, slot.index)
            wrapper.scale = scale
            wrappers.append(wrapper)
        first, last = self._model(recipe.first_model), self._model(recipe.last_model)
        shell = self.shell
        shell.model.layers = nn.ModuleList(wrappers)
        shell.config.num_hidden_layers = len(wrappers)
        shell.model.embed_tokens = first.model.embed_tokens
        shell.model.norm = last.model.norm
        # tied embeddings: the exported folder ties the head to the first model's embeddings
        shell.lm_head = first.lm_head if shell.config.tie_word_embeddings else last.lm_head
        return shell


def shared_weights(routed: nn.Module, sources: Mapping[str, nn.Module]) -> bool:
    """True when every tensor of ``routed`` is one of the sources' (nothing copied)."""
    own = {t.data_ptr() for m in sources.values() for t in [*m.parameters(), *m.buffers()]}
    return all(t.data_ptr() in own for t in [*routed.parameters(), *routed.buffers()])
