"""``evomerge bench merge``: time ``merge_into`` per method against the memory floor.

Merging is memory-bound, so the yardstick is the time to move the bytes a merge must
read and write. In the same run the benchmark times copying every tensor of the
model (read N bytes, write N bytes) and scales it to each method's traffic:

    task-vector methods: read the base and K task vectors, write the model -> K + 2
    linear:              read K models, write the model                     -> K + 1
    slerp:               read 2 models, write the model                     -> 3
    passthrough:         read 1 model, write the model                      -> 2

(DARE's cached draws, TIES' thresholds and other statistics are extra bytes the
engine chooses to read; they count against the method, not the floor.)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from evomerge._testing import config_for_params, write_family
from evomerge.errors import ConfigError
from evomerge.merge.engine import MergeEngine
from evomerge.merge.methods import get_method
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


def bench_recipe(method: str, base: str, models: list[str]) -> Recipe:
    """A representative recipe per method, with per-layer gradients where they apply."""
    if method == "linear":
        entries = [{"model": m, "parameters": {"weight": [0.2, 0.5 + 0.1 * i]}} for i, m in enumerate(models)]
        return Recipe.from_dict({"merge_method": method, "models": entries})
    if method == "slerp":
        return Recipe.from_dict(
            {"merge_method": method, "base_model": base, "models": [{"model": base}, {"model": models[0]}], "parameters": {"t": [0.2, 0.7]}}
        )
    if method == "nuslerp":
        entries = [{"model": m, "parameters": {"weight": [0.3, 0.6]}} for m in models[:2]]
        return Recipe.from_dict({"merge_method": method, "base_model": base, "models": entries})
    if method == "passthrough":  # one model copied, scaled
        return Recipe.from_dict({"merge_method": method, "models": [{"model": models[0], "parameters": {"scale": 0.5}}]})
    if method == "model_stock":
        return Recipe.from_dict({"merge_method": method, "base_model": base, "models": [{"model": m} for m in models]})
    entries = []
    for i, m in enumerate(models):
        p: dict[str, Any] = {"weight": [0.3 + 0.1 * i, 0.8 - 0.1 * i]}
        if method != "task_arithmetic":
            p["density"] = [0.3 + 0.1 * i, 0.6]
        entries.append({"model": m, "parameters": p})
    return Recipe.from_dict({"merge_method": method, "base_model": base, "models": entries, "random_seed": 7})


def traffic_units(method: str, k: int) -> int:
    """Tensor-sized reads plus writes a method cannot avoid (see module docstring)."""
    if method == "linear":
        return k + 1
    if method == "slerp":
        return 3
    if method == "nuslerp":
        return 4
    if method == "passthrough":
        return 2
    return k + 2


def bench_merge(
    *,
    n_params: int = 110_000_000,
    n_sources: int = 3,
    repeats: int = 3,
    methods: Optional[list[str]] = None,
    threads: Optional[int] = None,
    workdir: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    methods = list(methods or DEFAULT_METHODS)
    for method in methods:  # a typo fails before the family is built
        get_method(method, where="--methods")
    dup = next((m for m in methods if methods.count(m) > 1), None)
    if dup is not None:
        raise ConfigError(f"--methods: {dup} is named twice")
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # the family goes in a temp folder inside it
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cfg = config_for_params(n_params)
        say(f"building a {n_params / 1e6:.0f}M-parameter base and {n_sources} fine-tunes in {tmp} ...")
        folders = write_family(Path(tmp), n_sources, seed=0, cfg=cfg, tokenizer=False)
        sources = [SourceModel.open(str(f)) for f in folders]
        engine = MergeEngine(sources)
        base, models = str(folders[0]), [str(f) for f in folders[1:]]
        model = _live_model(cfg)
        n = sum(p.numel() for p in model.state_dict().values())
        copies = []
        rows = []
        for method in methods:
            recipe = bench_recipe(method, base, models)
            t0 = time.perf_counter()
            engine.merge_into(model, recipe)  # warm-up: caches and compiled kernels
            warm = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.merge_into(model, recipe)
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times)
            # measured next to the method, so load drift on the machine hits both alike
            floor_copy = _time_copy(engine, model, models[0], repeats)
            copies.append(floor_copy)
            floor = floor_copy * traffic_units(method, len(models)) / 2
            row = {
                "method": method,
                "seconds": seconds,
                "floor_seconds": floor,
                "ratio": seconds / floor,
                "target_ratio": TARGETS.get(method),
                "first_call_seconds": warm,
            }
            row["meets_target"] = None if row["target_ratio"] is None else row["ratio"] <= row["target_ratio"]
            rows.append(row)
            say(f"{method:18s} {seconds:7.3f} s  floor {floor:6.3f} s  ratio {row['ratio']:5.2f}")
            engine.clear_cache()
    return {
        "benchmark": "merge",
        "params": n,
        "sources": n_sources,
        "threads": torch.get_num_threads(),
        "copy_seconds": statistics.median(copies),
        "copy_gb_per_s": 2 * 4 * n / statistics.median(copies) / 1e9,
        "methods": rows,
    }


def _live_model(cfg: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to_empty(device="cpu").float()


def _time_copy(engine: MergeEngine, model: torch.nn.Module, other: str, repeats: int) -> float:
    """Seconds to copy every tensor of one source into the live model (read N, write N)."""
    sd = model.state_dict()
    srcs = {name: engine._work(other, name) for name in sd}
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, t in sd.items():
                t.copy_(srcs[name])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"merge_into on {result['params'] / 1e6:.0f}M parameters, {result['sources']} sources, "
        f"{result['threads']} threads; copy bandwidth {result['copy_gb_per_s']:.1f} GB/s",
        f"{'method':18s} {'seconds':>8s} {'floor':>8s} {'ratio':>6s} {'target':>7s}",
    ]
    for r in result["methods"]:
        target = f"<= {r['target_ratio']:.0f}x" if r["target_ratio"] else ""
        mark = "" if r["meets_target"] is None else ("  ok" if r["meets_target"] else "  MISSED")
        lines.append(f"{r['method']:18s} {r['seconds']:8.3f} {r['floor_seconds']:8.3f} {r['ratio']:6.2f} {target:>7s}{mark}")
    return "\n".join(lines)
