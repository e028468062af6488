"""``evomerge bench search``: how well a search keeps its workers busy, and what a worker costs.

For the ``serial`` executor and for the ``ray`` executor with 1 and 2 workers (by default),
one real search on the offline zoo each: the same config, seed and budget. Reported per
executor:

- ``candidates_per_minute``: trials finished per minute of the timed search;
- ``outside_fraction``: the share of worker time spent outside merge + evaluate,
  ``(wall x workers - sum(merge + evaluate)) / (wall x workers)``: dispatch, Ray calls,
  the driver's tell/ask/Pareto work while a worker waits for its next candidate, and the
  tail of the search when fewer candidates than workers are left;
- resident memory of each worker process: ``anon`` (private anonymous memory: the live
  model, heap, buffers; what the process alone costs), ``rss``, ``uss``, ``pss``. The
  sources and task vectors are memory-mapped files: their pages sit once in the page
  cache, shared by every worker of the node, and count in no worker's ``anon``.

- ``other_cpu_fraction``: the share of the machine's CPU that other processes used during
  the timed search (from the machine's and our processes' CPU times): above 10%, the
  figures are skewed and the table says so; run it again on a quiet machine.

Steady state: the clock starts at the first candidate the search dispatches and stops at
the last result. Actor start-up (importing torch, loading the model) and one warm-up job
per worker (the evaluator's data, the first forward pass) come before it and are
reported apart (``start_seconds``). The zoo's evaluator is CPU-bound (forward passes on
one thread per worker: ``cpus_per_worker`` 1), so on a 2-core machine 2 workers should
finish close to twice as many candidates per minute as 1.

The zoo model is tiny (~1 MB), far smaller than a Python process with torch loaded, so what
a worker adds in memory is measured on a synthetic family of ``memory_params`` parameters
(default 1e8: 390 MB per model in float32, a base and two fine-tunes): the private memory
(``anon``) of all workers with 2 workers minus with 1, against the size of one merged
model. ``extra_worker_model_bytes`` is the same difference counted from the moment each
worker had its libraries imported (``model_anon``: before the Worker loaded any weight).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

from evomerge.worker import Job

#: run folders of one invocation go under WORKDIR/runs/<this>, so a work folder can be reused
_STAMP = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

#: the skills the timed search merges (their specialists and evaluators)
SKILLS = ("add", "reverse", "sort", "count")


@contextmanager
def bench_workdir(workdir: Optional[Path], prefix: str) -> Iterator[Path]:
    """``workdir`` (created), or a temporary folder removed afterwards."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray cluster on every core for the block, unless one is running already."""
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if own:
            ray.shutdown()


class _Recorder:
    """An executor seen from the driver: when the first job went out, when the last result came.

    At both moments it also notes the CPU time the whole machine and this benchmark's own
    processes (driver and workers) have used, so that a figure skewed by other work on the
    machine says so (``other_cpu_fraction``).
    """

    def __init__(self, inner: Any, pids: list[int]):
        self.inner = inner
        self.slots = inner.slots
        self.pids = pids
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.cpu_first: Optional[tuple[float, float]] = None
        self.cpu_last: Optional[tuple[float, float]] = None
        self.busy = 0.0
        self.merge = 0.0
        self.write = 0.0  # the workers' own time on members: snapshots, waits, synchronous writes
        self.background = 0.0  # members written in the workers' background threads
        self.results = 0

    def submit(self, job: Job) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.cpu_first = _cpu(self.pids)
        self.inner.submit(job)

    def poll(self, timeout: Optional[float] = None) -> list:
        out = self.inner.poll(timeout)
        if out:
            self.last = time.perf_counter()
            self.cpu_last = _cpu(self.pids)
        for r in out:
            self.busy += r.merge_seconds + r.eval_seconds
            self.merge += r.merge_seconds
            self.write += r.write_seconds
            self.background += sum(d.seconds for d in r.writes_done)
            self.results += 1
        return out

    def in_flight(self) -> int:
        return self.inner.in_flight()

    def cancel_all(self) -> list:
        return self.inner.cancel_all()

    def flush(self) -> list:
        done = self.inner.flush()
        self.background += sum(d.seconds for d in done)
        return done

    def shutdown(self) -> None:
        self.inner.shutdown()


def _cpu(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds of these processes) so far."""
    import psutil

    busy = psutil.cpu_times()
    total = sum(getattr(busy, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    ours = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            ours += t.user + t.system
        except psutil.Error:
            pass
    return total, ours


def bench_search(
    *,
    zoo_dir: Path = Path("zoo"),
    trials: int = 24,
    ray_workers: Sequence[int] = (1, 2),
    cpus_per_worker: float = 1.0,
    optimizer: str = "random",
    limit: Optional[int] = None,
    memory_params: float = 1e8,
    memory_trials: int = 4,
    members_params: float = 0,
    members_trials: int = 10,
    holdout: bool = True,
    workdir: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; returns the table as a dict (see the module docstring)."""
    from evomerge.bench.quality import check_optimizers
    from evomerge.errors import ConfigError
    from evomerge.zoo import load_zoo, zoo

    # every setting checked before the zoo, Ray or a search starts
    check_optimizers([optimizer], flag="--optimizer")
    if not ray_workers or any(k < 1 for k in ray_workers) or len(set(ray_workers)) != len(ray_workers):
        raise ConfigError(f"--workers: expected different worker counts of at least 1, got {','.join(map(str, ray_workers)) or 'none'}")
    if not cpus_per_worker > 0:
        raise ConfigError(f"--cpus-per-worker must be more than 0, got {cpus_per_worker:g}")
    if members_params < 0:
        raise ConfigError(f"--members-params must be 0 (skip the members probe) or a model size, got {members_params:g}")
    if memory_params < 0:
        raise ConfigError(f"--memory-params must be 0 (skip the memory probe) or a model size, got {memory_params:g}")
    z = load_zoo(zoo_dir, quiet=True) or zoo(zoo_dir, progress=progress)  # any complete zoo will do
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    kept = workdir is not None  # a temporary folder is gone once the benchmark returns
    with bench_workdir(workdir, "evomerge-bench-search-") as workdir:
        with local_ray():
            cfg = _zoo_config(z, workdir, trials=trials, optimizer=optimizer, limit=limit)
            rows = [_measure(cfg, workdir, "serial", 1, cpus_per_worker, progress)]
            for k in ray_workers:
                rows.append(_measure(cfg, workdir, "ray", k, cpus_per_worker, progress))
            if holdout:  # the widest pool again, front members re-scored on the test split
                held = _zoo_config(z, workdir, trials=trials, optimizer=optimizer, limit=limit, holdout=True)
                rows.append(_measure(held, workdir, "ray", max(ray_workers), cpus_per_worker, progress, holdout=True))
            memory = None
            if memory_params and len(ray_workers) >= 2:
                memory = _memory_probe(workdir, int(memory_params), memory_trials, sorted(ray_workers)[:2], cpus_per_worker, progress)
        # in a fresh process: the driver's memory is a driver's, not this benchmark's
        members = _in_fresh_process(workdir, int(members_params), members_trials, cpus_per_worker, progress) if members_params else None
    if not kept:
        for r in rows:
            r.pop("run_dir", None)
    by = {r["executor"]: r for r in rows}
    result: dict[str, Any] = {
        "zoo": str(z.root),
        "trials": trials,
        "optimizer": optimizer,
        "cpus_per_worker": cpus_per_worker,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,  # other work on the machine skews the figures
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "merged_model_bytes": rows[0]["merged_model_bytes"],
        "rows": rows,
        "memory": memory,
        "members": members,
    }
    one, two = by.get("ray x1"), by.get("ray x2")
    if one and two:
        result["speedup_2_over_1"] = two["candidates_per_minute"] / one["candidates_per_minute"]
    with_held = next((r for r in rows if r.get("holdout_jobs") is not None), None)
    if with_held:
        plain = by[f"ray x{with_held['workers']}"]
        result["holdout_ratio"] = with_held["candidates_per_minute"] / plain["candidates_per_minute"] if plain["candidates_per_minute"] else 0.0
    return result


# ----------------------------------------------------------------------------- configs
def _zoo_config(z: Any, workdir: Path, *, trials: int, optimizer: str, limit: Optional[int], holdout: bool = False) -> Path:
    from evomerge.evaluate import build_evaluator

    evaluators = [{"preset": f"zoo_{s}", "name": s, "limit": limit, "split": "validation", "holdout_split": "test" if holdout else None} for s in SKILLS]
    objectives = []
    for s in SKILLS:
        for metric, direction in build_evaluator(f"zoo_{s}").metrics.items():
            objectives.append({"metric": f"{s}/{metric}", "direction": direction})
    data = {
        "sources": {"base_model": str(z.base), "models": [str(z.models[s]) for s in SKILLS]},
        "search_space": "ties_layerwise",
        "evaluators": [{k: v for k, v in e.items() if v is not None} for e in evaluators],
        "objectives": objectives,
        "optimizer": {"name": optimizer},
        "budget": {"trials": trials},
        "seed": 0,
        # Writing Pareto members' folders (nearly every trial with four objectives) takes CPU
        # from the workers whose scaling this measures; the members probe times it.
        "keep_pareto_models": False,
    }
    path = workdir / ("zoo_search_holdout.yaml" if holdout else "zoo_search.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _memory_config(family: list[Path], workdir: Path, trials: int) -> Path:
    preset = workdir / "probe.yaml"
    preset.write_text(yaml.safe_dump({"kind": "python", "name": "probe", "function": "evomerge.bench.search:probe", "metrics": {"norm": "maximize"}}))
    data = {
        "sources": {"base_model": str(family[0]), "models": [str(p) for p in family[1:]]},
        "search_space": "task_arithmetic_global",
        "evaluators": [{"preset": str(preset)}],
        "objectives": [{"metric": "probe/norm"}],
        "optimizer": {"name": "random"},
        "budget": {"trials": trials},
        "seed": 0,
        "keep_pareto_models": False,
    }
    path = workdir / "memory_search.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def probe_lm(model: Any, tokenizer: Any) -> dict[str, float]:
    """The members probe's evaluator: next-token loss on two fixed batches of random tokens
    (real forward passes, as an LM evaluator runs them; two objectives, so a front)."""
    import torch

    vocab = model.config.vocab_size
    out = {}
    with torch.no_grad():
        for key, seed in (("loss_a", 0), ("loss_b", 1)):
            ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)
            out[key] = float(model(input_ids=ids, labels=ids).loss)
    return out


def probe(model: Any, tokenizer: Any) -> dict[str, float]:
    """A cheap evaluator for the memory probe: reads every weight once."""
    import torch

    with torch.no_grad():
        return {"norm": float(sum(float(p.float().norm()) for p in model.parameters()))}


# ----------------------------------------------------------------------------- runs
def _measure(cfg: Path, workdir: Path, kind: str, k: int, cpus: float, progress: bool, name: Optional[str] = None,
             holdout: bool = False) -> dict[str, Any]:
    from evomerge.execute.serial import SerialExecutor
    from evomerge.run.api import create

    label = ("serial" if kind == "serial" else f"ray x{k}") + (" +held-out" if holdout else "")
    if progress:
        print(f"bench search: {label} ...", flush=True)
    run = create(cfg, runs_dir=workdir / "runs" / _STAMP, name=name or label.replace(" ", "").replace("+", "_"))
    threads = max(1, int(cpus))
    spec = run.worker_spec(threads=threads)
    t0 = time.perf_counter()
    if kind == "serial":
        import torch

        before = torch.get_num_threads()
        ex: Any = SerialExecutor(spec, workers=1)
    else:
        from evomerge.execute.ray import RayExecutor

        ex = RayExecutor(spec, workers=k, cpus_per_worker=cpus)
    try:
        # One warm-up job per worker, untimed: evaluator data, first forward pass.
        warm = run.space.to_recipe(run.space.center(), random_seed=run.config.seed).to_dict()
        for i in range(k):
            ex.submit(Job(-1 - i, warm))
        while ex.in_flight():
            ex.poll()
        start_s = time.perf_counter() - t0
        pids = [os.getpid()] + ([i["pid"] for i in ex.worker_info()] if kind == "ray" else [])
        rec = _Recorder(ex, pids)
        inside0 = ex.busy_seconds() if kind == "ray" else None
        summary = run.run(executor=rec, progress=False)
        inside = ex.busy_seconds() - inside0 if kind == "ray" else None
        memory = _worker_memory(ex, kind)
    finally:
        ex.shutdown()
        if kind == "serial":
            torch.set_num_threads(before)
    wall = (rec.last or 0.0) - (rec.first or 0.0)
    other = None
    if rec.cpu_first and rec.cpu_last and wall > 0:
        (m0, o0), (m1, o1) = rec.cpu_first, rec.cpu_last
        other = max(0.0, ((m1 - m0) - (o1 - o0)) / (wall * (os.cpu_count() or 1)))
    n = summary["n_complete"] + summary["n_failed"] + summary["n_pruned"]
    return {
        "executor": label,
        "workers": k,
        "threads_per_worker": threads,
        "slots": ex.slots,
        "start_seconds": start_s,
        "candidates": n,
        "failed": summary["n_failed"],
        "wall_seconds": wall,
        "candidates_per_minute": 60.0 * n / wall if wall > 0 else 0.0,
        "merge_seconds": rec.merge,
        "busy_seconds": rec.busy,
        "outside_fraction": max(0.0, (wall * k - rec.busy) / (wall * k)) if wall > 0 else 0.0,
        # Ray: the part of it the actors spent waiting for a job (the rest: Ray calls, heap trims, backups)
        "idle_fraction": max(0.0, (wall * k - inside) / (wall * k)) if inside is not None and wall > 0 else None,
        # share of the machine's CPU used by other processes (Ray's own daemons included) meanwhile
        "other_cpu_fraction": other,
        "merged_model_bytes": _model_bytes(run),
        "memory": memory,
        # with held-out scoring: front members re-scored in this session, their worker seconds, those left for resume
        "holdout_jobs": summary["holdout_jobs"] if holdout else None,
        "holdout_seconds": summary["holdout_seconds"] if holdout else None,
        "holdout_deferred": summary["holdout_deferred"] if holdout else None,
        "front": len(summary["pareto"]),
        "members_written": summary.get("members_written", 0),
        "write_seconds": rec.write,  # the workers' own time on members (snapshots, waits)
        "background_write_seconds": rec.background,  # member folders written in their background threads
        "run_dir": str(run.run_dir),
    }


def _worker_memory(ex: Any, kind: str) -> list[dict[str, Any]]:
    if kind == "serial":
        from evomerge.execute.ray import _memory

        return [dict(_memory(), worker_id="serial-0 (the driver process)")]
    mems = ex.worker_memory()
    infos = {i["worker_id"]: i for i in ex.worker_info()}
    for m in mems:
        bare = infos.get(m["worker_id"], {}).get("bare_memory", {})
        m["bare"] = bare
        if "anon" in m and "anon" in bare:
            m["model_anon"] = m["anon"] - bare["anon"]  # what loading and serving added, page cache aside
    return mems


def _model_bytes(run: Any) -> int:
    src = run.sources[0]
    total = 0
    for name in src.tensor_names:
        n = 1
        for d in src.shape(name):
            n *= d
        total += n * 4  # the live model is float32
    return total


def _members_probe(workdir: Path, n_params: int, trials: int, cpus: float, progress: bool) -> dict[str, Any]:
    """A Ray x2 search on a bfloat16 family of ``n_params`` (base + 3 fine-tunes) that keeps
    its Pareto members: the driver's private memory (sampled) and the share of the
    workers' time spent writing members' folders."""
    import torch

    from evomerge._testing import config_for_params, write_family
    from evomerge.bench.scale import AnonPeak
    from evomerge.execute.ray import RayExecutor
    from evomerge.run.api import create

    family = [workdir / "membersfam" / n for n in ("base", "ft0", "ft1", "ft2")]  # written by the parent process
    preset = workdir / "probe_lm.yaml"
    preset.write_text(yaml.safe_dump({"kind": "python", "name": "lm", "function": "evomerge.bench.search:probe_lm",
                                      "metrics": {"loss_a": "minimize", "loss_b": "minimize"}}))
    cfg = workdir / "members_search.yaml"
    cfg.write_text(yaml.safe_dump({
        "sources": {"base_model": str(family[0]), "models": [str(p) for p in family[1:]]},
        "search_space": "task_arithmetic_global", "evaluators": [{"preset": str(preset)}],
        "objectives": [{"metric": "lm/loss_a", "direction": "minimize"}, {"metric": "lm/loss_b", "direction": "minimize"}],
        "optimizer": {"name": "random"}, "budget": {"trials": trials}, "seed": 0, "dtype": "bfloat16", "keep_pareto_models": True,
    }, sort_keys=False))
    if progress:
        print(f"bench search: ray x2, {trials} trials, Pareto members written ...", flush=True)
    run = create(cfg, runs_dir=workdir / "runs" / _STAMP, name="members")
    ex = RayExecutor(run.worker_spec(threads=max(1, int(cpus))), workers=2, cpus_per_worker=cpus)
    rec = _Recorder(ex, [os.getpid()])
    try:
        with AnonPeak() as peak:
            summary = run.run(executor=rec, progress=False)
    finally:
        ex.shutdown()
    busy = rec.busy + rec.write
    pareto = run.run_dir / "pareto"
    return {
        "params": n_params,
        "trials": trials,
        "members": len(summary["pareto"]),
        "members_written": summary["members_written"],
        "member_folder_bytes": sum(f.stat().st_size for f in pareto.rglob("*") if f.is_file()) // max(1, len(summary["pareto"])),
        "driver_private_peak_bytes": peak.peak,
        "worker_write_seconds": rec.write,
        "background_write_seconds": rec.background,
        "worker_busy_seconds": busy,
        "write_fraction": rec.write / busy if busy else 0.0,
    }


def _in_fresh_process(workdir: Path, n_params: int, trials: int, cpus: float, progress: bool) -> dict[str, Any]:
    """The family is written here; the search runs in a fresh driver process."""
    import json
    import subprocess
    import sys

    import torch

    from evomerge._testing import config_for_params, write_family

    if progress:
        print(f"bench search: writing a bfloat16 family of {n_params / 1e9:.1f}B parameters (base + 3 fine-tunes) ...", flush=True)
    write_family(workdir / "membersfam", 3, seed=0, cfg=config_for_params(n_params), dtype=torch.bfloat16, tokenizer=True)
    args = json.dumps({"workdir": str(workdir), "params": n_params, "trials": trials, "cpus": cpus, "progress": progress})
    proc = subprocess.run([sys.executable, "-m", "evomerge.bench.search", args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the members probe failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _members_main(args: dict) -> dict[str, Any]:
    with local_ray():
        return _members_probe(Path(args["workdir"]), args["params"], args["trials"], args["cpus"], args["progress"])


def _memory_probe(workdir: Path, n_params: int, trials: int, ks: list[int], cpus: float, progress: bool) -> dict[str, Any]:
    from evomerge._testing import config_for_params, write_family

    family = write_family(workdir / "memfam", 2, seed=0, cfg=config_for_params(n_params, vocab=4096))
    cfg = _memory_config(family, workdir, trials)
    rows = {k: _measure(cfg, workdir, "ray", k, cpus, progress, name=f"mem{k}") for k in ks}
    a, b = rows[ks[0]], rows[ks[1]]

    def total(row: dict, key: str) -> int:
        return sum(m.get(key, 0) for m in row["memory"])

    extra = (ks[1] - ks[0]) or 1
    merged = a["merged_model_bytes"]
    extra_anon = (total(b, "anon") - total(a, "anon")) / extra
    extra_model = (total(b, "model_anon") - total(a, "model_anon")) / extra
    return {
        "params": n_params,
        "merged_model_bytes": merged,
        "source_bytes": merged * len(family),
        "workers": ks,
        "anon_total_bytes": {str(k): total(rows[k], "anon") for k in ks},
        "model_anon_total_bytes": {str(k): total(rows[k], "model_anon") for k in ks},
        "pss_total_bytes": {str(k): total(rows[k], "pss") for k in ks},
        "extra_worker_bytes": extra_anon,
        "extra_worker_over_merged_model": extra_anon / merged,
        "extra_worker_model_bytes": extra_model,
        "extra_worker_model_over_merged_model": extra_model / merged,
        "extra_worker_pss_bytes": (total(b, "pss") - total(a, "pss")) / extra,
        "per_worker": {str(k): rows[k]["memory"] for k in ks},
    }


# ----------------------------------------------------------------------------- table
def format_table(result: dict[str, Any]) -> str:
    mb = 1 / 2**20
    lines = [
        f"bench search: {result['trials']} trials of {result['optimizer']} on the zoo ({', '.join(SKILLS)}), "
        f"{result['cpu_count']} CPUs, {result['cpus_per_worker']:g} CPU per worker; merged model {result['merged_model_bytes'] * mb:.2f} MiB",
        f"{'executor':<16} {'workers':>7} {'start s':>8} {'cand/min':>9} {'outside':>8} {'(idle)':>7} {'merge+eval s':>13} "
        f"{'anon/worker MiB':>16} {'PSS/worker MiB':>15} {'other CPU':>10}",
    ]
    for r in result["rows"]:
        anon = [m.get("anon", 0) * mb for m in r["memory"]]
        pss = [m.get("pss", m.get("rss", 0)) * mb for m in r["memory"]]
        idle = "-" if r["idle_fraction"] is None else f"{100 * r['idle_fraction']:.1f}%"
        other = "-" if r.get("other_cpu_fraction") is None else f"{100 * r['other_cpu_fraction']:.0f}%"
        lines.append(
            f"{r['executor']:<16} {r['workers']:>7} {r['start_seconds']:>8.1f} {r['candidates_per_minute']:>9.1f} "
            f"{100 * r['outside_fraction']:>7.1f}% {idle:>7} "
            f"{r['busy_seconds']:>13.1f} {'/'.join(f'{p:.0f}' for p in anon):>16} "
            f"{'/'.join(f'{p:.0f}' for p in pss):>15} {other:>10}"
        )
    if "speedup_2_over_1" in result:
        lines.append(f"throughput ray x2 / ray x1: {result['speedup_2_over_1']:.2f}x")
    held = next((r for r in result["rows"] if r.get("holdout_jobs") is not None), None)
    if held and "holdout_ratio" in result:
        lines.append(
            f"held-out scoring on: {result['holdout_ratio']:.2f}x the candidates per minute without it (target >= 0.8); "
            f"{held['holdout_jobs']} of a front of {held['front']} re-scored ({held['holdout_seconds']:.1f} worker s), "
            f"{held['holdout_deferred']} left for resume"
        )
    if any((r.get("other_cpu_fraction") or 0) > 0.1 for r in result["rows"]):
        lines.append("warning: other processes used more than 10% of the CPUs during a timed search; its figures are skewed")
    m = result.get("memory")
    if m:
        k1, k2 = m["workers"]
        lines.append(
            f"memory probe: {m['params'] / 1e6:.0f}M parameters, merged model {m['merged_model_bytes'] * mb:.0f} MiB, "
            f"sources {m['source_bytes'] * mb:.0f} MiB; private memory of all workers {m['anon_total_bytes'][str(k1)] * mb:.0f} MiB "
            f"with {k1}, {m['anon_total_bytes'][str(k2)] * mb:.0f} MiB with {k2}"
        )
        lines.append(
            f"  an extra worker adds {m['extra_worker_model_bytes'] * mb:.0f} MiB = {m['extra_worker_model_over_merged_model']:.2f}x the merged model "
            f"once its libraries are loaded; with its Python process (torch, transformers, inductor) "
            f"{m['extra_worker_bytes'] * mb:.0f} MiB = {m['extra_worker_over_merged_model']:.2f}x; PSS with page-cache shares "
            f"{m['extra_worker_pss_bytes'] * mb:.0f} MiB"
        )
    w = result.get("members")
    if w:
        lines.append(
            f"members probe: ray x2 on {w['params'] / 1e9:.1f}B parameters (bfloat16, base + 3 fine-tunes), {w['trials']} trials, "
            f"{w['members_written']} member folders written by the workers ({w['member_folder_bytes'] * mb:.0f} MiB each), front of {w['members']}"
        )
        lines.append(
            f"  driver private memory peak {w['driver_private_peak_bytes'] * mb:.0f} MiB (target < 600); workers spent "
            f"{100 * w['write_fraction']:.1f}% of their time writing members ({w['worker_write_seconds']:.1f} of {w['worker_busy_seconds']:.1f} s; target < 5%)"
        )
        if w.get("background_write_seconds"):
            lines.append(
                f"  (snapshots and waits; the folders took {w['background_write_seconds']:.1f} s to write in the workers' "
                "background threads while they merged and scored the next candidates)"
            )
    if result.get("load_average"):
        start = result.get("load_average_start")
        at_start = f"{' '.join(f'{x:.2f}' for x in start)} at the start, " if start else ""
        lines.append(f"load average (1, 5, 15 min): {at_start}{' '.join(f'{x:.2f}' for x in result['load_average'])} at the end")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the members probe's fresh driver process
    import json
    import sys

    print(json.dumps(_members_main(json.loads(sys.argv[1]))))
