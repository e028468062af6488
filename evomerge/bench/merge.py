"""``evomerge bench merge``: time ``merge_into`` per method against the memory floor.

Merging is memory-bound, so the yardstick is the time to move the bytes a merge must
read and write. In the same run the benchmark times copying every tensor of one source
into the live model (read N bytes, write N bytes, in the sources' dtype) and scales it
to each method's traffic (:meth:`MergeMethod.traffic`): task-vector methods read the
base and K models and write the model (K + 2), linear reads K models (K + 1), slerp 3.

Each row, for float32 and for bfloat16 sources (and a live model of that dtype):

- ``candidate``: a new recipe per merge (weights and densities change), what a search
  pays per candidate: TIES and Breadcrumbs find new exact thresholds, DELLA new
  masked norms; ``ratio`` is this against the floor (the targets hold on it);
- ``repeat``: the same recipe again (thresholds and norms already known);
- the floor: the median of copies timed next to each of those merges;
- ``first``: the first merge in a fresh process with an empty compile cache (``cold``)
  and with the cache a previous process left (``warm``): statistics and compilation,
  what a new worker pays once.

Statistics, draws and thresholds are bytes the engine chooses to read or compute; they
count against the method, not the floor.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from evomerge._testing import config_for_params, write_family
from evomerge.errors import ConfigError
from evomerge.merge.engine import MergeEngine
from evomerge.merge.methods import METHODS, get_method
from evomerge.merge.recipe import Recipe
from evomerge.sources import SourceModel

DEFAULT_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "model_stock",
)
TARGETS = {
    "linear": 2.0,
    "task_arithmetic": 2.0,
    "ties": 5.0,
    "dare_linear": 5.0,
    "dare_ties": 5.0,
    "breadcrumbs": 5.0,
    "breadcrumbs_ties": 5.0,
}
DTYPES = ("float32", "bfloat16")


def example_recipe(method: str, base: str, models: list[str], variant: int = 0) -> Recipe:
    """A representative recipe for any registered method: per-layer gradients for every
    numeric parameter it takes, as many of ``models`` as it accepts. ``variant`` shifts
    the values (a new candidate)."""
    spec = get_method(method)
    shift = 0.013 * variant
    last: Optional[ConfigError] = None
    for k in range(len(models), 0, -1):
        entries = []
        for i, m in enumerate(models[:k]):
            params: dict[str, Any] = {}
            for p in spec.model_params:
                if p.name == "weight":
                    params["weight"] = [round(0.3 + 0.1 * i + shift, 4), round(0.8 - 0.1 * i - shift, 4)]
                elif p.name == "density":
                    params["density"] = [round(0.3 + 0.1 * i + shift, 4), round(0.6 - shift, 4)]
                elif p.name == "scale":
                    params["scale"] = 0.5
            entries.append({"model": m, "parameters": params} if params else {"model": m})
        data: dict[str, Any] = {"merge_method": method, "models": entries, "random_seed": 7}
        if spec.base != "none":
            data["base_model"] = base
        shared = {p.name: [round(0.2 + shift, 4), round(0.7 - shift, 4)] for p in spec.shared_params if p.required and p.type is float}
        if shared:
            data["parameters"] = shared
        try:
            return Recipe.from_dict(data, where=f"bench recipe for {method}")
        except ConfigError as exc:  # too many models for this method: try fewer
            last = exc
    raise ConfigError(f"no bench recipe fits merge method {method}: {last}")


def bench_merge(
    *,
    n_params: int = 110_000_000,
    n_sources: int = 3,
    repeats: int = 5,
    methods: Optional[list[str]] = None,
    dtypes: Optional[list[str]] = None,
    threads: Optional[int] = None,
    workdir: Optional[Path] = None,
    first_merge: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    methods = list(methods or DEFAULT_METHODS)
    dtypes = list(dtypes or DTYPES)
    for method in methods:  # a typo fails before the family is built
        get_method(method, where="--methods")
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtypes: {dtype!r} is not one of float32, bfloat16, float16")
    for label, names in (("--methods", methods), ("--dtypes", dtypes)):
        dup = next((m for m in names if names.count(m) > 1), None)
        if dup is not None:
            raise ConfigError(f"{label}: {dup} is named twice")
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # the family goes in a temp folder inside it
    rows = []
    copies: dict[str, float] = {}
    n = 0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cfg = config_for_params(n_params)
        for dtype in dtypes:
            say(f"building a {n_params / 1e6:.0f}M-parameter {dtype} base and {n_sources} fine-tunes in {tmp} ...")
            folders = write_family(Path(tmp) / dtype, n_sources, seed=0, cfg=cfg, dtype=getattr(torch, dtype), tokenizer=False)
            base, models = str(folders[0]), [str(f) for f in folders[1:]]
            model = live_model(cfg, getattr(torch, dtype))
            n = sum(p.numel() for p in model.state_dict().values())
            engine = MergeEngine([SourceModel.open(str(f)) for f in folders], live_model_bytes=_bytes(model))
            dtype_copies = []
            for method in methods:
                row = _bench_method(engine, model, method, base, models, repeats)
                dtype_copies.append(row.pop("copy_seconds"))
                row["dtype"] = dtype
                if first_merge:
                    row["first_cold_seconds"], row["first_warm_seconds"] = first_merges(method, folders, cfg, dtype)
                rows.append(row)
                first = f"  first {row['first_cold_seconds']:6.1f} s cold {row['first_warm_seconds']:5.1f} s warm" if first_merge else ""
                say(
                    f"{dtype:9s} {method:17s} candidate {row['seconds']:7.3f} s  repeat {row['repeat_seconds']:7.3f} s  "
                    f"floor {row['floor_seconds']:6.3f} s  ratio {row['ratio']:5.2f}{first}"
                )
                engine.clear_cache()
            copies[dtype] = statistics.median(dtype_copies)
            del engine, model
    itemsize = {d: torch.empty((), dtype=getattr(torch, d)).element_size() for d in dtypes}
    return {
        "benchmark": "merge",
        "params": n,
        "sources": n_sources,
        "threads": torch.get_num_threads(),
        "copy_seconds": copies,
        "copy_gb_per_s": {d: 2 * itemsize[d] * n / copies[d] / 1e9 for d in dtypes},
        "methods": rows,
    }


def _bench_method(engine: MergeEngine, model: torch.nn.Module, method: str, base: str, models: list[str], repeats: int) -> dict[str, Any]:
    recipe = example_recipe(method, base, models)
    engine.merge_into(model, recipe)  # statistics and compiled kernels of this process
    other = models[0]
    copy_once(engine, model, other)  # the copy's first touch of the source's pages
    # each timed merge next to a timed copy: load drift on the machine (other processes,
    # memory bandwidth shared with them) hits the method and its floor alike
    repeat, candidate, copies = [], [], []
    for _ in range(repeats):
        copies.append(copy_once(engine, model, other))
        t0 = time.perf_counter()
        engine.merge_into(model, recipe)
        repeat.append(time.perf_counter() - t0)
    for variant in range(1, repeats + 1):
        fresh = example_recipe(method, base, models, variant=variant)
        copies.append(copy_once(engine, model, other))
        t0 = time.perf_counter()
        engine.merge_into(model, fresh)
        candidate.append(time.perf_counter() - t0)
    copy = statistics.median(copies)
    k = len([r for r in recipe.model_refs if r != recipe.base_model])
    floor = copy * get_method(method).traffic(k) / 2
    seconds = statistics.median(candidate)
    target = TARGETS.get(method)
    return {
        "method": method,
        "seconds": seconds,
        "repeat_seconds": statistics.median(repeat),
        "floor_seconds": floor,
        "ratio": seconds / floor,
        "repeat_ratio": statistics.median(repeat) / floor,
        "target_ratio": target,
        "meets_target": None if target is None else seconds / floor <= target,
        "copy_seconds": copy,
    }


ADAPTER_TARGET = 0.1  # a low-rank candidate against the same merge of the materialized models


def bench_merge_adapters(
    *,
    n_params: int = 110_000_000,
    n_adapters: int = 3,
    rank: int = 16,
    repeats: int = 3,
    methods: Optional[list[str]] = None,
    threads: Optional[int] = None,
    workdir: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """LoRA adapters against the full fine-tunes they stand for, in one run.

    A base, ``n_adapters`` rank-``rank`` PEFT adapters and the same adapters merged into
    full model folders. Per method, new candidates are merged (a) from the adapters into a
    LoRA live model (linear merges: only the factors change) or a plain one (other
    methods: updates made per block of rows), and (b) from the full models into a plain
    live model; the ratio a/b is what an adapter search saves per candidate.
    """
    from transformers import AutoModelForCausalLM

    from evomerge._testing import write_lora_adapters
    from evomerge.merge.low_rank import lora_live_model, low_rank_adapters

    torch.set_num_threads(threads or os.cpu_count() or 1)
    methods = list(methods or ("linear", "task_arithmetic", "ties"))
    for method in methods:
        get_method(method, where="--methods")
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cfg = config_for_params(n_params)
        say(f"building a {n_params / 1e6:.0f}M-parameter base, {n_adapters} rank-{rank} adapters and their full models in {tmp} ...")
        (base,) = write_family(Path(tmp), 0, seed=0, cfg=cfg, tokenizer=False)
        adapters, fulls = write_lora_adapters(Path(tmp), base, n_adapters, rank=rank, seed=0)
        n = sum(p.numel() for p in live_model(cfg).state_dict().values())
        for method in methods:
            on_adapters = MergeEngine.from_recipe(example_recipe(method, str(base), [str(a) for a in adapters]))
            on_fulls = MergeEngine.from_recipe(example_recipe(method, str(base), [str(f) for f in fulls]))
            plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            factors = low_rank_adapters(on_adapters, [str(a) for a in adapters])
            live = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            plan = on_adapters.plan(example_recipe(method, str(base), [str(a) for a in adapters]))
            if factors and all(get_method(method).linear_coefficients(p) is not None for p in plan if p.inputs):
                live = lora_live_model(live, factors)  # linear in the adapters: only the factors change
            times = {}
            for label, engine, model, folders in (("adapters", on_adapters, live, adapters), ("full", on_fulls, plain, fulls)):
                engine.merge_into(model, example_recipe(method, str(base), [str(f) for f in folders]))  # statistics, compilation
                t = []
                for variant in range(1, repeats + 1):
                    recipe = example_recipe(method, str(base), [str(f) for f in folders], variant=variant)
                    t0 = time.perf_counter()
                    engine.merge_into(model, recipe)
                    t.append(time.perf_counter() - t0)
                times[label] = statistics.median(t)
            low_rank = hasattr(live, "evomerge_layout")
            ratio = times["adapters"] / times["full"]
            row = {
                "method": method,
                "low_rank": low_rank,
                "adapter_seconds": times["adapters"],
                "full_seconds": times["full"],
                "ratio": ratio,
                "target_ratio": ADAPTER_TARGET if low_rank else None,
                "meets_target": (ratio <= ADAPTER_TARGET) if low_rank else None,
            }
            rows.append(row)
            say(f"{method:17s} adapters {row['adapter_seconds']:8.4f} s ({'LoRA factors' if low_rank else 'updates per block'})  full models {row['full_seconds']:7.3f} s  ratio {ratio:6.3f}")
    return {"benchmark": "merge_adapters", "params": n, "adapters": n_adapters, "rank": rank, "threads": torch.get_num_threads(), "methods": rows}


def format_adapter_table(result: dict[str, Any]) -> str:
    lines = [
        f"merge_into on a {result['params'] / 1e6:.0f}M-parameter base: {result['adapters']} rank-{result['rank']} LoRA adapters "
        f"against the same adapters merged into full models, {result['threads']} threads; seconds per new candidate",
        f"{'method':17s} {'adapters':>9s} {'how':>18s} {'full':>8s} {'ratio':>7s} {'target':>7s}",
    ]
    for r in result["methods"]:
        how = "LoRA factors" if r["low_rank"] else "updates per block"
        target = f"<= {r['target_ratio']:g}x" if r["target_ratio"] else ""
        mark = "" if r["meets_target"] is None else ("  ok" if r["meets_target"] else "  MISSED")
        lines.append(f"{r['method']:17s} {r['adapter_seconds']:9.4f} {how:>18s} {r['full_seconds']:8.3f} {r['ratio']:7.3f} {target:>7s}{mark}")
    return "\n".join(lines)


def first_merges(method: str, folders: list[Path], cfg: dict, dtype: str) -> tuple[float, float]:
    """Seconds of the first merge of a fresh process, compile cache empty then warm."""
    with tempfile.TemporaryDirectory(prefix="evomerge-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        return tuple(_first_merge(method, folders, cfg, dtype, env) for _ in range(2))  # type: ignore[return-value]


def _first_merge(method: str, folders: list[Path], cfg: dict, dtype: str, env: dict) -> float:
    args = json.dumps({"method": method, "folders": [str(f) for f in folders], "cfg": cfg, "dtype": dtype, "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "evomerge.bench.merge", args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"first-merge probe of {method} failed: {proc.stderr.strip()[-500:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def live_model(cfg: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A Llama of the config's shape, uninitialized, in ``dtype`` (merges overwrite every tensor)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to_empty(device="cpu").to(dtype)


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def copy_once(engine: MergeEngine, model: torch.nn.Module, other: str) -> float:
    """Seconds to copy every tensor of one source into the live model (read N, write N)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(engine.full(other, name))
    return time.perf_counter() - t0


def time_copy(engine: MergeEngine, model: torch.nn.Module, other: str, repeats: int) -> float:
    """Median of :func:`copy_once` over ``repeats``, after one untimed copy."""
    copy_once(engine, model, other)
    return statistics.median(copy_once(engine, model, other) for _ in range(repeats))


def format_table(result: dict[str, Any]) -> str:
    gbs = ", ".join(f"{d} {v:.1f} GB/s" for d, v in result["copy_gb_per_s"].items())
    lines = [
        f"merge_into on {result['params'] / 1e6:.0f}M parameters, {result['sources']} sources, "
        f"{result['threads']} threads; copy bandwidth {gbs}",
        "candidate: a new recipe per merge (what a search pays); repeat: the same recipe again; "
        "first: a fresh process's first merge, compile cache cold / warm",
        f"{'dtype':9s} {'method':17s} {'candidate':>9s} {'repeat':>7s} {'floor':>7s} {'ratio':>6s} {'target':>7s}      {'first cold':>10s} {'warm':>6s}",
    ]
    for r in result["methods"]:
        target = f"<= {r['target_ratio']:.0f}x" if r["target_ratio"] else ""
        mark = "    " if r["meets_target"] is None else ("  ok" if r["meets_target"] else "  MISSED")
        first = f"{r['first_cold_seconds']:9.1f}s {r['first_warm_seconds']:5.1f}s" if "first_cold_seconds" in r else ""
        lines.append(
            f"{r['dtype']:9s} {r['method']:17s} {r['seconds']:9.3f} {r['repeat_seconds']:7.3f} {r['floor_seconds']:7.3f} "
            f"{r['ratio']:6.2f} {target:>7s}{mark:6s} {first}"
        )
    return "\n".join(lines)


def _probe(args: dict) -> None:
    """The fresh process of :func:`first_merges`: open, build the live model, time one merge."""
    torch.set_num_threads(args["threads"])
    folders = args["folders"]
    engine = MergeEngine([SourceModel.open(f) for f in folders])
    model = live_model(args["cfg"], getattr(torch, args["dtype"]))
    recipe = example_recipe(args["method"], folders[0], folders[1:])
    t0 = time.perf_counter()
    engine.merge_into(model, recipe)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


if __name__ == "__main__":  # pragma: no cover - run by first_merges in a fresh process
    _probe(json.loads(sys.argv[1]))


__all__ = ["DEFAULT_METHODS", "METHODS", "TARGETS", "bench_merge", "example_recipe", "format_table", "live_model", "time_copy"]
