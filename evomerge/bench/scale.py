"""``evomerge bench scale``: memory, disk and time per parameter of merging, measured and
extrapolated to real models.

For each family size (``--params``), number of fine-tunes (``--sources``) and method, a
fresh process opens a bfloat16 family, builds a bfloat16 live model (every page
touched), then merges three candidates into it (the first computes the per-tensor
statistics and compiles the kernels). Measured:

- ``private``: the peak of the process's private anonymous memory (``RssAnon``,
  sampled every millisecond) above what it held with the live model loaded: what the
  engine costs beyond the model. Sources are memory-mapped: page cache shared by the
  workers of a node, not private memory;
- ``device``: on CUDA, ``max_memory_allocated`` above the live model;
- ``disk``: bytes the merge wrote outside the compile cache (the engine keeps no run
  cache: this checks it), and the compile cache it left, shared by every run;
- ``first`` and ``merge`` seconds against the memory-traffic floor (copying one source
  into the live model, scaled to the method's reads and writes).

A line through the two sizes gives bytes per added parameter (the slope) and the fixed
part. With ``--config`` (a Hugging Face ``config.json``; Llama-3.1-8B and -70B ship in
``examples/configs/``) the fit and the engine's own placement (what it keeps resident on
the device under the budget, what it streams, its workspace) predict a real model's
merge-time memory on a GPU of ``--device-memory``, with a verdict.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from evomerge.errors import ConfigError

SCALE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "model_stock")
TWO_SOURCE_METHODS = {"slerp": 1}  # fine-tunes besides the base that a method takes at most
EXAMPLE = {"method": "ties", "fine_tunes": 2, "dtype": "bfloat16"}  # the README's examples/hf_llama.yaml
PRIVATE_SLOPE_TARGET = 1.0  # bytes per added parameter
FIXED_TARGET = 1 << 30
DISK_TARGET = 0.5  # bytes per parameter and source


# ----------------------------------------------------------------------------- measuring
class AnonPeak:
    """Peak private anonymous memory of this process, sampled every millisecond in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")  # resident - file/shmem = anonymous

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> "AnonPeak":
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def probe(args: dict) -> dict[str, Any]:
    """One measurement in this (fresh) process; see the module docstring."""
    from evomerge.bench.merge import example_recipe, live_model, time_copy
    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.methods import get_method
    from evomerge.sources import SourceModel

    torch.set_num_threads(args["threads"])
    device = args["device"]
    folders = args["folders"]
    model = live_model(args["cfg"], torch.bfloat16).to(device)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.zero_()  # every page of the live model is resident before the baseline
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    engine = MergeEngine([SourceModel.open(f) for f in folders], device=device, live_model_bytes=model_bytes, n_models=len(folders) - 1)
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = AnonPeak.now()
    times = []
    with AnonPeak() as peak:
        for variant in range(3):
            recipe = example_recipe(args["method"], folders[0], folders[1:], variant=variant)
            t0 = time.perf_counter()
            engine.merge_into(model, recipe)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    device_beyond = torch.cuda.max_memory_allocated() - model_bytes if device.startswith("cuda") else None
    copy = time_copy(engine, model, folders[1], 2)
    k = len([r for r in recipe.model_refs if r != recipe.base_model])
    floor = copy * get_method(args["method"]).traffic(k) / 2
    return {
        "private_bytes": peak.peak - baseline,
        "device_bytes": device_beyond,
        "first_seconds": times[0],
        "merge_seconds": min(times[1:]),
        "floor_seconds": floor,
        "placement": engine.placement.describe(),
        "workspace_planned_bytes": engine.placement.workspace_bytes,
        "chunk_numel": engine.chunk_numel,
    }


def _run_probe(args: dict, workdir: Path, eager: bool) -> dict[str, Any]:
    """The probe in a fresh process whose temp files and compile cache are counted."""
    scratch = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    compile_cache = workdir / "inductor"  # shared by the probes, like by the workers of a machine
    env = dict(os.environ, TMPDIR=str(scratch), TORCHINDUCTOR_CACHE_DIR=str(compile_cache))
    if eager:
        env["EVOMERGE_COMPILE"] = "0"
    before = _tree_bytes(compile_cache)
    proc = subprocess.run([sys.executable, "-m", "evomerge.bench.scale", json.dumps(args)], capture_output=True, text=True, env=env, cwd=scratch)
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale probe {args['method']} failed: {proc.stderr.strip()[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # inductor's precompiled headers go to $TMPDIR/torchinductor_<user>: compile cache, not the run's
    headers = sum(_tree_bytes(d) for d in scratch.glob("torchinductor_*"))
    result["disk_bytes"] = _tree_bytes(scratch) - headers
    result["compile_cache_bytes"] = max(0, _tree_bytes(compile_cache) - before) + headers
    _remove(scratch)
    return result


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) if Path(root).exists() else 0


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the benchmark
def bench_scale(
    *,
    params: tuple[float, ...] = (1e8, 3e8),
    sources: tuple[int, ...] = (2, 4),
    methods: Optional[list[str]] = None,
    configs: tuple[Path, ...] = (),
    device: str = "cpu",
    device_memory: Optional[str] = None,
    threads: Optional[int] = None,
    workdir: Optional[Path] = None,
    eager: tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Measure (see the module docstring); ``eager``: methods also probed with eager kernels
    (what the GPU runs), to check the engine's workspace bound against their temporaries
    (slow on a CPU: eager DARE at 100M parameters takes minutes)."""
    from evomerge._testing import config_for_params, write_family
    from evomerge.merge.budget import parse_bytes
    from evomerge.merge.methods import get_method

    methods = list(methods or SCALE_METHODS)
    for m in methods:
        get_method(m, where="--methods")
    unknown = [m for m in eager if m not in methods]
    if unknown:
        raise ConfigError(f"--eager: {', '.join(unknown)} is not among the measured methods ({', '.join(methods)})")
    if len(set(params)) < 2:
        raise ConfigError("--params: give at least two sizes (the fit needs two points)")
    device_total = parse_bytes(device_memory, "--device-memory") if device_memory else None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device")
    configs = tuple(Path(c) for c in configs)
    for c in configs:
        _config_params(c)  # a bad config fails before any family is built
    threads = threads or os.cpu_count() or 1
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    rows: list[dict[str, Any]] = []
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=workdir) as tmp:
        root = Path(tmp)
        for p in sorted(set(params)):
            cfg = config_for_params(p)
            for k in sorted(set(sources)):
                say(f"bench scale: writing a bfloat16 family of {p / 1e6:.0f}M parameters, base + {k} fine-tunes ...")
                family = write_family(root / f"family-{p:.0e}-{k}", k, seed=0, cfg=cfg, dtype=torch.bfloat16, tokenizer=False)
                n = sum(math.prod(s) for s in _shapes(cfg).values())
                for method in methods:
                    use = family[: 1 + min(k, TWO_SOURCE_METHODS.get(method, k))]
                    args = {"method": method, "folders": [str(f) for f in use], "cfg": cfg, "threads": threads, "device": device}
                    r = _run_probe(args, root, eager=False)
                    row = {"method": method, "params": n, "fine_tunes": len(use) - 1, "sources": len(use), **r}
                    if device == "cpu" and method in eager:  # the GPU's kernels run eagerly: what their temporaries cost
                        e = _run_probe(args, root, eager=True)
                        row["eager_private_bytes"] = e["private_bytes"]
                    rows.append(row)
                    say(
                        f"  {method:16s} private {row['private_bytes'] / 2**20:7.1f} MiB  disk {row['disk_bytes'] / 2**20:5.1f} MiB  "
                        f"first {row['first_seconds']:6.2f} s  merge {row['merge_seconds']:6.3f} s (floor {row['floor_seconds']:.3f} s)"
                    )
                _remove(root / f"family-{p:.0e}-{k}")
    fits = _fit(rows)
    result: dict[str, Any] = {"benchmark": "scale", "device": device, "threads": threads, "dtype": "bfloat16", "rows": rows, "fits": fits}
    result["predictions"] = [predict(c, fits, device_total=device_total) for c in configs]
    return result


def _fit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and number of fine-tunes: a line through the sizes (least squares)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["fine_tunes"]), []).append(r)
    fits = []
    for (method, k), rs in sorted(groups.items()):
        xs = [r["params"] for r in rs]
        if len(set(xs)) < 2:
            continue
        slope, fixed = _line(xs, [r["private_bytes"] for r in rs])
        fit = {
            "method": method,
            "fine_tunes": k,
            "private_bytes_per_param": slope,
            "private_fixed_bytes": fixed,
            "disk_bytes_per_param_per_source": max(r["disk_bytes"] / (r["params"] * r["sources"]) for r in rs),
            "merge_seconds_per_param": _line(xs, [r["merge_seconds"] for r in rs])[0],
            "first_seconds_per_param": _line(xs, [r["first_seconds"] for r in rs])[0],
            "merge_over_floor": max(r["merge_seconds"] / r["floor_seconds"] for r in rs),
        }
        if all("eager_private_bytes" in r for r in rs):
            fit["eager_private_bytes_per_param"], fit["eager_private_fixed_bytes"] = _line(xs, [r["eager_private_bytes"] for r in rs])
            fit["eager_workspace_measured_bytes"] = max(r["eager_private_bytes"] for r in rs)
            fit["workspace_planned_bytes"] = max(r["workspace_planned_bytes"] for r in rs)
        fit["meets"] = {
            "private_slope": slope <= PRIVATE_SLOPE_TARGET,
            "private_fixed": fixed < FIXED_TARGET,
            "disk": fit["disk_bytes_per_param_per_source"] <= DISK_TARGET,
        }
        fits.append(fit)
    return fits


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


# ----------------------------------------------------------------------------- predicting
def _config_params(path: Path) -> tuple[int, int, str]:
    """(parameters, tensors, name) of the model a config.json describes (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the file's fault
        raise ConfigError(f"--config {path}: not a model config transformers can build ({' '.join(str(exc).split())[:160]})") from None
    state = model.state_dict()
    return sum(t.numel() for t in state.values()), len(state), path.stem


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from evomerge._testing import llama_tensor_shapes

    return llama_tensor_shapes(cfg)


def predict(config: Path, fits: list[dict[str, Any]], *, device_total: Optional[int] = None) -> dict[str, Any]:
    """The README example's merge (two fine-tunes, TIES, bfloat16, one GPU per worker) on
    the model of ``config``: device peak from the engine's own placement under the default
    budget, host memory and disk from the measured fit."""
    from evomerge.merge.budget import DEVICE_SHARE, MemoryBudget, format_bytes, plan_placement

    n, n_tensors, name = _config_params(Path(config))
    method, k = EXAMPLE["method"], EXAMPLE["fine_tunes"]
    total = device_total or int(80e9)
    model_bytes = 2 * n  # bfloat16
    fit = next((f for f in fits if f["method"] == method and f["fine_tunes"] == k), None)
    fit = fit or next((f for f in fits if f["method"] == method), None)
    out: dict[str, Any] = {"config": str(config), "model": name, "params": n, "tensors": n_tensors, "method": method, "fine_tunes": k,
                           "device_memory": total, "budget": int(DEVICE_SHARE * total)}
    try:
        placement = plan_placement([(f"source{i}", model_bytes) for i in range(k + 1)], device="cuda", live_model_bytes=model_bytes,
                                   n_models=k, budget=MemoryBudget(), device_total=total)
    except ConfigError:
        out.update(fits=False, peak_bytes=None, verdict=f"does not fit: the live model alone is {format_bytes(model_bytes)}, over the "
                   f"{format_bytes(DEVICE_SHARE * total)} budget of a {format_bytes(total)} GPU; use a larger GPU or more than one")
        return out
    if fit is not None and "eager_workspace_measured_bytes" in fit:  # measured eager temporaries, scaled to the GPU's chunk
        workspace = max(placement.workspace_bytes, fit["eager_workspace_measured_bytes"] / fit["workspace_planned_bytes"] * placement.workspace_bytes)
    else:
        workspace = placement.workspace_bytes
    peak = placement.live_model_bytes + placement.resident_bytes + workspace
    out.update(
        fits=peak <= placement.budget_bytes,
        live_model_bytes=placement.live_model_bytes,
        resident_sources=len(placement.resident),
        resident_bytes=placement.resident_bytes,
        streamed_sources=len(placement.streamed),
        streamed_bytes_per_merge=placement.streamed_bytes,
        workspace_bytes=workspace,
        peak_bytes=peak,
        room_for_evaluation_bytes=total - peak,
        host_private_bytes=None if fit is None else fit["private_fixed_bytes"] + fit["private_bytes_per_param"] * n,
        disk_bytes=None if fit is None else fit["disk_bytes_per_param_per_source"] * n * (k + 1),
    )
    out["verdict"] = (
        f"{'fits' if out['fits'] else 'does not fit'}: peak {format_bytes(peak)} of the {format_bytes(placement.budget_bytes)} budget "
        f"({format_bytes(total)} GPU x {DEVICE_SHARE}), {format_bytes(total - peak)} left for evaluation"
    )
    return out


# ----------------------------------------------------------------------------- report
def format_table(result: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"bench scale on {result['device']}, {result['threads']} threads, bfloat16 sources and live model",
        f"{'method':16s} {'params':>7s} {'ft':>3s} {'private MiB':>11s} {'eager MiB':>9s} {'disk MiB':>8s} {'first s':>8s} {'merge s':>8s} {'floor s':>8s}",
    ]
    for r in result["rows"]:
        eager = f"{r['eager_private_bytes'] / mib:9.1f}" if "eager_private_bytes" in r else f"{'':9s}"
        lines.append(
            f"{r['method']:16s} {r['params'] / 1e6:6.0f}M {r['fine_tunes']:3d} {r['private_bytes'] / mib:11.1f} {eager} {r['disk_bytes'] / mib:8.1f} "
            f"{r['first_seconds']:8.2f} {r['merge_seconds']:8.3f} {r['floor_seconds']:8.3f}"
        )
    lines += ["", "fit per method (a line through the sizes): private memory beyond the live model, disk, time",
              f"{'method':16s} {'ft':>3s} {'B/param':>8s} {'fixed MiB':>9s} {'disk B/param/src':>16s} {'merge/floor':>11s}  targets"]
    for f in result["fits"]:
        ok = "ok" if all(f["meets"].values()) else "MISSED " + ",".join(k for k, v in f["meets"].items() if not v)
        lines.append(
            f"{f['method']:16s} {f['fine_tunes']:3d} {f['private_bytes_per_param']:8.3f} {f['private_fixed_bytes'] / mib:9.1f} "
            f"{f['disk_bytes_per_param_per_source']:16.4f} {f['merge_over_floor']:11.2f}  {ok}"
        )
    for p in result.get("predictions", []):
        lines += ["", f"prediction: {p['model']} ({p['params'] / 1e9:.2f}B parameters), {p['method']}, {p['fine_tunes']} fine-tunes, bfloat16, "
                  f"one {p['device_memory'] / 1e9:.0f} GB GPU per worker"]
        if p.get("peak_bytes") is None:
            lines.append(f"  {p['verdict']}")
            continue
        lines.append(
            f"  device: live model {p['live_model_bytes'] / 1e9:.1f} GB + {p['resident_sources']} resident source(s) {p['resident_bytes'] / 1e9:.1f} GB "
            f"+ workspace {p['workspace_bytes'] / 1e9:.2f} GB = {p['peak_bytes'] / 1e9:.1f} GB; "
            f"{p['streamed_sources']} source(s) streamed ({p['streamed_bytes_per_merge'] / 1e9:.1f} GB per merge)"
        )
        if p.get("host_private_bytes") is not None:
            lines.append(f"  host: private memory beyond the live model {p['host_private_bytes'] / 2**30:.2f} GiB; run cache on disk {p['disk_bytes'] / 2**20:.1f} MiB")
        lines.append(f"  {p['verdict']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the probe's fresh process
    print(json.dumps(probe(json.loads(sys.argv[1]))))
