"""MergeEngine: sources + cached task vectors -> merged tensors, in place or to disk.

The engine opens each source once and caches, per tensor, what every later
candidate needs: the task vector ``model - base``, its L1 norm, its magnitudes
sorted (so a TIES or Breadcrumbs threshold for any density is a lookup, not a
sort), and for the random methods the uniform draws behind DARE and DELLA masks
(so the same seed gives the same masks, and a mask at a lower density is a subset
of the mask at a higher one: common random numbers make the search landscape
smooth). A candidate recipe then costs one fused pass over the weights.

Example:
    >>> recipe = Recipe.from_yaml("recipe.yaml")               # doctest: +SKIP
    >>> engine = MergeEngine.from_recipe(recipe)                # doctest: +SKIP
    >>> engine.merge_into(model, recipe)    # live nn.Module    # doctest: +SKIP
    >>> engine.write(recipe, Path("out"))  # HF folder          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from evomerge.errors import MergeError, SourceError
from evomerge.io import atomic_folder, check_output_folder
from evomerge.merge.card import model_card
from evomerge.merge import methods as M
from evomerge.merge._cache import SharedCache
from evomerge.merge._kernels import Kernels, linear_into, linear_kernel, masked_l1_kernel, task_vector_into, task_vector_kernel
from evomerge.merge.recipe import Recipe, parse_dtype
from evomerge.sources import SourceModel, check_compatible, layer_index

SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class TensorPlan:
    """Everything needed to merge one tensor: its layer position and resolved parameters."""

    name: str
    t: float
    shared: dict[str, Any]
    inputs: tuple[str, ...]  # model refs in merge order (base excluded for task vectors)
    per_model: dict[str, dict[str, Any]]


class MergeEngine:
    """Merge candidates from a fixed set of source models, fast and repeatably."""

    def __init__(
        self,
        sources: Sequence[SourceModel],
        *,
        device: str = "cpu",
        compile: Optional[bool] = None,
        cache_dir: Optional[Path] = None,
    ):
        if not sources:
            raise MergeError("no source models given")
        self.sources: dict[str, SourceModel] = {s.ref: s for s in sources}
        self.names = check_compatible(list(sources))
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError(f"device {device} was asked for, but no CUDA device is available here")
        self.kernels = Kernels(compile)
        self._delta: dict[tuple[str, str, str], torch.Tensor] = {}
        self._l1: dict[tuple[str, str, str], float] = {}
        self._sorted: dict[tuple[str, str, str], torch.Tensor] = {}
        self._ranks: dict[tuple[str, str, str], torch.Tensor] = {}
        self._draws: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}
        # Files other processes can map instead of recomputing (see prepare()).
        self.shared = SharedCache(cache_dir) if cache_dir is not None and self.device.type == "cpu" else None

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        allow_pickle: bool = False,
        base_dir: Optional[Path] = None,
        device: str = "cpu",
        compile: Optional[bool] = None,
    ) -> "MergeEngine":
        """Open and check every model a recipe names (the base first)."""
        refs = recipe.model_refs
        if recipe.base_model is not None:
            refs = [recipe.base_model] + [r for r in refs if r != recipe.base_model]
        sources = [SourceModel.open(r, allow_pickle=allow_pickle, base_dir=base_dir) for r in refs]
        return cls(sources, device=device, compile=compile)

    # ------------------------------------------------------------------ planning
    def source(self, ref: str) -> SourceModel:
        try:
            return self.sources[ref]
        except KeyError:
            raise MergeError(f"recipe names model {ref}, which this engine was not opened with") from None

    def _reference(self, recipe: Recipe) -> SourceModel:
        return self.source(recipe.base_model if recipe.base_model is not None else recipe.models[0].model)

    def plan(self, recipe: Recipe) -> list[TensorPlan]:
        """Resolve every parameter for every tensor; all errors surface here, before merging."""
        method = M.get_method(recipe.merge_method)
        ref = self._reference(recipe)
        for r in recipe.model_refs:
            self.source(r)
        n_layers = ref.num_layers
        if method.kind == "task_vectors":
            inputs = tuple(m.model for m in recipe.models if m.model != recipe.base_model)
        elif method.kind in ("slerp",):
            inputs = tuple(r for r in recipe.model_refs if r != recipe.base_model)
        elif method.kind in ("nuslerp", "model_stock"):
            inputs = tuple(m.model for m in recipe.models if m.model != recipe.base_model)
        else:  # linear, passthrough: every model, the base too when named
            inputs = tuple(recipe.model_refs)
        plans = []
        for name in self.names:
            if not _is_float(ref.dtype(name)):
                plans.append(TensorPlan(name, 0.0, {}, (), {}))
                continue
            layer = layer_index(name)
            t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
            shared = {p.name: self._resolve(recipe, p, name, t, None) for p in method.shared_params}
            per_model = {
                m: {p.name: self._resolve(recipe, p, name, t, m) for p in method.model_params} for m in inputs
            }
            if method.sparsify == "della":
                for m, p in per_model.items():
                    if 0 < p["density"] < 1:
                        M.della_probabilities(torch.zeros(()), p["density"], p["epsilon"])
            if method.kind == "linear" and shared["normalize"] and abs(sum(p["weight"] for p in per_model.values())) < 1e-8:
                # normalize divides by the weights' sum: every value of the tensor would be nan or inf
                raise MergeError(
                    f"linear: the weights of tensor {name} sum to 0, and normalize divides by their sum; "
                    "give a non-zero weight or set normalize: false"
                )
            plans.append(TensorPlan(name, t, shared, inputs, per_model))
        return plans

    @staticmethod
    def _resolve(recipe: Recipe, spec: M.ParamSpec, tensor: str, t: float, model: Optional[str]) -> Any:
        value = recipe.resolve(spec.name, tensor, t, model)
        if value is None:
            if spec.required:
                who = f"model {model}, " if model else ""
                where = "that model's parameters, or the recipe's parameters for every model" if model else "the recipe's parameters"
                raise MergeError(f"missing required parameter '{spec.name}' for {who}tensor {tensor}: set it in {where}")
            return spec.default
        where = f"parameter '{spec.name}' for {'model ' + model + ', ' if model else ''}tensor {tensor}"
        return spec.validate(value, where=where)

    # ------------------------------------------------------------------ caches
    def _raw(self, ref: str, name: str) -> torch.Tensor:
        src = self.source(ref)
        if name not in src._meta and name == "lm_head.weight" and src.tied_embeddings:
            name = "model.embed_tokens.weight"
        return src.tensor(name).to(self.device)

    def _work(self, ref: str, name: str) -> torch.Tensor:
        """A source tensor in the float32 working precision (a view when already float32)."""
        return self._raw(ref, name).to(torch.float32)

    def delta_shape(self, model: str, name: str) -> tuple[int, ...]:
        src = self.source(model)
        if name not in src._meta and name == "lm_head.weight" and src.tied_embeddings:
            name = "model.embed_tokens.weight"
        return src.shape(name)

    def delta(self, base: str, model: str, name: str) -> torch.Tensor:
        """Task vector ``model - base`` for one tensor, computed once."""
        key = (base, model, name)
        d = self._delta.get(key)
        if d is None:
            d = self._shared("delta", (base, model), name)
            if d is None:
                d = (self._work(model, name) - self._work(base, name)).contiguous()
            self._delta[key] = d
        return d

    def _shared(self, kind: str, key: tuple, name: str) -> Optional[torch.Tensor]:
        if self.shared is None:
            return None
        return self.shared.get(kind, self._file_key(key), name)

    def _file_key(self, key: tuple) -> tuple:
        """Refs become resolved paths, so every process names the same file."""
        return tuple(str(self.sources[k].path) if isinstance(k, str) and k in self.sources else k for k in key)

    def delta_l1(self, base: str, model: str, name: str) -> float:
        key = (base, model, name)
        if key not in self._l1:
            self._l1[key] = float(self.delta(base, model, name).abs().sum(dtype=torch.float64))
        return self._l1[key]

    def sorted_magnitudes(self, base: str, model: str, name: str) -> torch.Tensor:
        """|task vector| sorted descending, computed once per tensor."""
        key = (base, model, name)
        s = self._sorted.get(key)
        if s is None:
            s = self._shared("sorted", (base, model), name)
            if s is None:
                s = torch.sort(self.delta(base, model, name).abs().reshape(-1), descending=True).values
            self._sorted[key] = s
        return s

    def rank_norm(self, base: str, model: str, name: str) -> torch.Tensor:
        """Each entry's magnitude rank within its row, scaled to [0, 1] (DELLA)."""
        key = (base, model, name)
        r = self._ranks.get(key)
        if r is None:
            r = self._shared("ranks", (base, model), name)
        if r is None:
            d = self.delta(base, model, name)
            rows = d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(1, -1)
            order = torch.argsort(rows.abs(), dim=1)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
            span = max(rows.shape[1] - 1, 1)
            r = (ranks.to(torch.float32) / span).reshape(d.shape)
        self._ranks[key] = r
        return r

    def draws(self, model: str, index: int, name: str, seed: int) -> torch.Tensor:
        """Uniform 16-bit draws behind the random masks of one model's tensor.

        Stored as a [2, *shape] uint8 tensor (high byte, low byte): half the size of
        a float32 task vector, and fast to read in a fused kernel.

        Seeded by (seed, model position, tensor name), so they do not depend on the
        model's path or on the order tensors are merged in.
        """
        key_seed = _stable_seed(seed, index, name)
        hit = self._draws.get((model, name))
        if hit is not None and hit[0] == key_seed:
            return hit[1]
        d = self._shared("draws", (model, index, seed), name)
        if d is None:
            gen = torch.Generator(device="cpu").manual_seed(key_seed)
            d = torch.empty((2, *self.delta_shape(model, name)), dtype=torch.uint8).random_(0, 256, generator=gen)
            d = d.to(self.device)
        self._draws[(model, name)] = (key_seed, d)
        return d

    def prepare(self, recipe: Recipe, *, progress: bool = False) -> None:
        """Compute once what ``recipe``'s method needs for every tensor and, with a
        ``cache_dir``, write it to files that every engine on this node maps."""
        method = M.get_method(recipe.merge_method)
        if method.kind != "task_vectors" and method.kind != "nuslerp":
            return
        base = recipe.base_model
        if base is None:
            return
        seed = recipe.random_seed if recipe.random_seed is not None else 0
        models = [m.model for m in recipe.models if m.model != base]
        float_names = [n for n in self.names if _is_float(self.source(base).dtype(n))]
        kinds = ["delta"]
        if method.sparsify in ("magnitude", "outliers"):
            kinds.append("sorted")
        if method.sparsify == "della":
            kinds.append("ranks")
        with _progress(progress, len(models) * len(kinds), "preparing task vectors") as advance:
            for index, model in enumerate(models):
                for kind in kinds:
                    key = (base, model)
                    if self.shared is not None and self.shared.has(kind, self._file_key(key)):
                        advance()
                        continue
                    get = {"delta": self.delta, "sorted": self.sorted_magnitudes, "ranks": self.rank_norm}[kind]
                    tensors = {n: get(base, model, n) for n in float_names}
                    if self.shared is not None:
                        self.shared.save(kind, self._file_key(key), tensors)
                    advance()
                if method.random and self.shared is not None and not self.shared.has("draws", self._file_key((model, index, seed))):
                    draws = {n: self.draws(model, index, n, seed) for n in float_names}
                    self.shared.save("draws", self._file_key((model, index, seed)), draws)
        if self.shared is not None:
            self.clear_cache()  # from now on every statistic is read from the mapped files

    def clear_cache(self) -> None:
        for cache in (self._delta, self._l1, self._sorted, self._ranks, self._draws):
            cache.clear()

    # ------------------------------------------------------------------ merging
    def merged_tensor(self, recipe: Recipe, plan: TensorPlan, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The merged value of one tensor in float32 (int tensors: the reference's).

        With ``out`` (a contiguous float32 tensor of the right shape) the fused kernels
        of linear, slerp, nuslerp, model_stock, passthrough and the task-vector methods write into it and return None; other
        methods return a tensor as usual.
        """
        method = M.get_method(recipe.merge_method)
        ref = self._reference(recipe)
        if not plan.inputs:
            return self._raw(ref.ref, plan.name)
        kind = method.kind
        if kind == "task_vectors":
            return self._task_vectors(recipe, method, plan, out)
        if kind == "linear":
            weights = [plan.per_model[m]["weight"] for m in plan.inputs]
            total = sum(weights) if plan.shared["normalize"] else None
            return self._weighted_sum([self._raw(m, plan.name) for m in plan.inputs], weights, out, total)
        if kind == "slerp" or (kind == "nuslerp" and plan.shared["nuslerp_flatten"]):
            return self._spherical(recipe, kind, plan, out)
        if kind == "nuslerp":
            a, b = plan.inputs
            t = self._nuslerp_t(plan)
            opts = dict(row_wise=plan.shared["nuslerp_row_wise"], flatten=False)
            if recipe.base_model is not None:
                base = recipe.base_model
                return self._work(base, plan.name) + M.nuslerp(
                    t, self.delta(base, a, plan.name), self.delta(base, b, plan.name), **opts
                )
            return M.nuslerp(t, self._work(a, plan.name), self._work(b, plan.name), **opts)
        if kind == "model_stock" and not plan.shared["filter_wise"]:
            # ratio * mean(models) + (1 - ratio) * base: one fused pass for the angles, one to write
            base = self._work(recipe.base_model, plan.name)
            models = [self._work(m, plan.name) for m in plan.inputs]
            n = len(models)
            gram = self.kernels.run(M.offset_gram, base.numel(), base, models).double().tolist()
            ratio = M.model_stock_ratio(gram, n)
            return self._weighted_sum([base, *models], [1 - ratio] + [ratio / n] * n, out)
        if kind == "model_stock":
            return M.model_stock(
                self._work(recipe.base_model, plan.name),
                [self._work(m, plan.name) for m in plan.inputs],
                filter_wise=plan.shared["filter_wise"],
            )
        if kind == "passthrough":
            (only,) = plan.inputs
            scale = plan.per_model[only]["scale"]
            if out is not None:  # the fused kernel copies (and scales) straight into out: one read, one write
                return self._weighted_sum([self._raw(only, plan.name)], [1.0 if scale is None else scale], out)
            return M.passthrough(self._work(only, plan.name), scale)
        raise MergeError(f"merge method {recipe.merge_method} has no implementation")

    @staticmethod
    def _nuslerp_t(plan: TensorPlan) -> float:
        a, b = plan.inputs
        wa, wb = plan.per_model[a]["weight"], plan.per_model[b]["weight"]
        total = wa + wb
        return 0.5 if abs(total) < 1e-6 else wb / total

    def _spherical(self, recipe: Recipe, kind: str, plan: TensorPlan, out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """slerp, and nuslerp over whole tensors: ``ca * a + cb * b`` (plus the base for
        nuslerp of task vectors). One fused pass sums a.a, b.b and a.b for the angle, a
        second writes the weighted sum: two reads of each input instead of a dozen."""
        name, base = plan.name, recipe.base_model
        if kind == "slerp":
            a, b, t, offset = self._work(base, name), self._work(plan.inputs[0], name), float(plan.shared["t"]), None
        else:
            t = self._nuslerp_t(plan)
            ma, mb = plan.inputs
            if base is not None:
                a, b, offset = self.delta(base, ma, name), self.delta(base, mb, name), self._work(base, name)
            else:
                a, b, offset = self._work(ma, name), self._work(mb, name), None
        n = a.numel()
        aa, bb, ab = self.kernels.run(M.pair_sums, n, a, b).double().tolist() if n else (0.0, 0.0, 0.0)
        weights = M.slerp_weights(t, aa, bb, ab) if kind == "slerp" else M.nuslerp_weights(t, aa, bb, ab)
        if offset is None:
            return self._weighted_sum([a, b], list(weights), out)
        return self._weighted_sum([a, b, offset], [*weights, 1.0], out)

    def _weighted_sum(self, tensors: list[torch.Tensor], weights: list[float], out: Optional[torch.Tensor], total: Optional[float] = None) -> Optional[torch.Tensor]:
        """``sum(w * x) [/ total]`` in float32 by the fused linear kernel, into ``out`` when given."""
        w = [torch.tensor(x, dtype=torch.float32) for x in weights]
        args = (tensors, w, torch.tensor(1.0 if total is None else total, dtype=torch.float32), total is not None)
        if out is not None:
            return self.kernels.run(linear_into, tensors[0].numel(), out, *args)
        return self.kernels.run(linear_kernel, tensors[0].numel(), *args)

    def _task_vectors(self, recipe: Recipe, method: M.MethodSpec, plan: TensorPlan, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        base_ref = recipe.base_model
        name = plan.name
        base = self._work(base_ref, name)
        deltas, aux, weights = [], [], []
        rescale = bool(plan.shared["rescale"]) and method.sparsify is not None
        seed = recipe.random_seed if recipe.random_seed is not None else 0
        for index, model in enumerate(plan.inputs):
            p = plan.per_model[model]
            deltas.append(self.delta(base_ref, model, name))
            aux.append(self._mask_aux(method.sparsify, base_ref, model, index, name, p, seed))
            weights.append(torch.tensor(p["weight"], dtype=torch.float32))
        scales = self._l1_scales(method.sparsify, base_ref, plan, deltas, aux) if rescale else None
        lam = torch.tensor(plan.shared["lambda"], dtype=torch.float32)
        if out is not None:
            return self.kernels.run(
                task_vector_into, base.numel(), out, base, deltas, aux, weights, scales, lam,
                method.sparsify, method.consensus, bool(plan.shared["normalize"]),
            )
        return self.kernels.run(
            task_vector_kernel,
            base.numel(),
            base,
            deltas,
            aux,
            weights,
            scales,
            lam,
            method.sparsify,
            method.consensus,
            bool(plan.shared["normalize"]),
        )

    def _mask_aux(
        self, kind: Optional[str], base: str, model: str, index: int, name: str, p: dict, seed: int
    ) -> list[torch.Tensor]:
        """Per-tensor statistics the fused mask needs (thresholds, draws, ranks)."""
        f32 = dict(dtype=torch.float32)
        density = p.get("density", 1.0)
        if kind is None:
            return []
        if kind == "magnitude":
            thr = M.magnitude_threshold(self.sorted_magnitudes(base, model, name), density)
            return [torch.tensor(-math.inf if thr is None else thr, **f32)]
        if kind == "outliers":
            band = M.outlier_band(self.sorted_magnitudes(base, model, name), density, p["gamma"])
            lo, hi = band if band is not None else (-math.inf, math.inf)
            return [torch.tensor(lo, **f32), torch.tensor(hi, **f32)]
        if kind == "random":
            cut = M.random_threshold(density) if density < 1 else M.UNIFORM_LEVELS
            return [self.draws(model, index, name, seed), torch.tensor(float(cut), **f32)]
        if kind == "della":
            eps = p["epsilon"]
            if density >= 1:
                low, span = 2.0, 0.0  # keep every entry, as mergekit does at density 1
            elif density <= 0:
                low, span = -1.0, 0.0
            else:
                low, span = density - eps, 2 * eps
            return [
                self.draws(model, index, name, seed),
                self.rank_norm(base, model, name),
                torch.tensor(low, **f32),
                torch.tensor(span, **f32),
            ]
        raise MergeError(f"unknown sparsification {kind}")

    def _l1_scales(
        self, kind: Optional[str], base: str, plan: TensorPlan, deltas: list[torch.Tensor], aux: list
    ) -> list[torch.Tensor]:
        """mergekit's rescale: give each masked task vector its full L1 norm back."""
        after = self.kernels.run(masked_l1_kernel, deltas[0].numel(), deltas, aux, kind).tolist()
        scales = []
        for model, a in zip(plan.inputs, after):
            before = self.delta_l1(base, model, plan.name)
            full = plan.per_model[model].get("density", 1.0) >= 1  # mergekit leaves it untouched
            ratio = 1.0 if full or before < 1e-7 or a < 1e-7 else before / a
            scales.append(torch.tensor(ratio, dtype=torch.float32))
        return scales

    # ------------------------------------------------------------------ outputs
    def merge_into(self, model: torch.nn.Module, recipe: Recipe) -> dict[str, float]:
        """Write the merged weights into a live model, in place, with no disk I/O.

        Returns timings. The model must have the sources' architecture; its
        parameter names are the checkpoint's tensor names.
        """
        start = time.perf_counter()
        plans = self.plan(recipe)
        targets = model.state_dict(keep_vars=True)
        for plan in plans:
            if plan.name not in targets:
                raise MergeError(f"the live model has no tensor named {plan.name}")
            if tuple(targets[plan.name].shape) != self._reference(recipe).shape(plan.name):
                raise MergeError(
                    f"shape mismatch at tensor {plan.name}: live model has {list(targets[plan.name].shape)}, "
                    f"sources have {list(self._reference(recipe).shape(plan.name))}"
                )
        with torch.no_grad():
            for plan in plans:
                target = targets[plan.name].data
                direct = target.dtype == torch.float32 and target.is_contiguous() and target.device == self.device
                value = self.merged_tensor(recipe, plan, out=target if direct else None)
                if value is not None:  # methods without an in-place kernel, or a cast is needed
                    target.copy_(value)
        return {"merge_seconds": time.perf_counter() - start}

    def write(
        self,
        recipe: Recipe,
        out: Path,
        *,
        overwrite: bool = False,
        progress: bool = False,
        shard_bytes: int = SHARD_BYTES,
    ) -> dict[str, Any]:
        """Write the merged model as a Hugging Face folder, atomically.

        safetensors shards, config, generation config, tokenizer (from
        ``tokenizer_source`` or the base), ``merge_recipe.yaml`` and a model card.
        """
        from safetensors.torch import save_file

        out = Path(out)
        check_output_folder(out, overwrite)
        start = time.perf_counter()
        plans = self.plan(recipe)
        ref = self._reference(recipe)
        out_dtype = self._out_dtype(recipe, ref)
        tok_src = self._tokenizer_source(recipe, ref)
        shards = _assign_shards(
            [(p.name, math.prod(ref.shape(p.name)) * _itemsize(out_dtype if _is_float(ref.dtype(p.name)) else ref.dtype(p.name))) for p in plans],
            shard_bytes,
        )
        with atomic_folder(out, overwrite=overwrite) as tmp, _progress(progress, len(plans), f"merging {recipe.merge_method}") as advance:
            weight_map: dict[str, str] = {}
            total_size = 0
            by_name = {p.name: p for p in plans}
            for i, names in enumerate(shards):
                fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                tensors = {}
                for name in names:
                    value = self.merged_tensor(recipe, by_name[name])
                    if value.is_floating_point():
                        value = value.to(out_dtype)
                    tensors[name] = value.detach().to("cpu").contiguous().clone()
                    total_size += tensors[name].numel() * tensors[name].element_size()
                    weight_map[name] = fname
                    advance()
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                del tensors
            if len(shards) > 1:
                index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            config = dict(ref.config)
            dtype_key = "torch_dtype" if "torch_dtype" in config else "dtype"
            config[dtype_key] = str(out_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            gen = ref.path / "generation_config.json"
            if gen.is_file():
                shutil.copy2(gen, tmp / gen.name)
            for f in tok_src.tokenizer_files():
                shutil.copy2(f, tmp / f.name)
            if recipe.chat_template:
                (tmp / "chat_template.jinja").write_text(recipe.chat_template)
            text = recipe.to_yaml()
            (tmp / "merge_recipe.yaml").write_text(text)
            (tmp / "README.md").write_text(
                model_card(text, base_model=recipe.base_model, models=recipe.model_refs, title=out.name)
            )
        return {
            "out": str(out),
            "merge_method": recipe.merge_method,
            "n_tensors": len(plans),
            "n_shards": len(shards),
            "dtype": str(out_dtype).removeprefix("torch."),
            "seconds": time.perf_counter() - start,
        }

    def _out_dtype(self, recipe: Recipe, ref: SourceModel) -> torch.dtype:
        if recipe.out_dtype:
            return parse_dtype(recipe.out_dtype)
        if recipe.dtype:
            return parse_dtype(recipe.dtype)
        for name in self.names:
            if _is_float(ref.dtype(name)):
                return getattr(torch, ref.dtype(name))
        return torch.float32

    def _tokenizer_source(self, recipe: Recipe, ref: SourceModel) -> SourceModel:
        ts = recipe.tokenizer_source
        if ts in (None, "base"):
            return ref
        if ts in self.sources:
            return self.sources[ts]
        try:
            return SourceModel.open(ts)
        except SourceError as exc:
            raise MergeError(f"tokenizer_source: {exc}") from None


def _is_float(dtype: str) -> bool:
    return dtype in ("float32", "float16", "bfloat16", "float64")


def _itemsize(dtype: Any) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def _assign_shards(sizes: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _stable_seed(seed: int, index: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class _progress:
    """A rich progress bar over tensors, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
