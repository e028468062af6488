"""``evomerge bench search --real DIR``: evomerge's search on the real family against the
loop a user would otherwise write around mergekit.

Both sides merge the same recipes and score them with the same evaluators (the real
family's presets ``real_<skill>`` on their validation split, ``--limit`` examples each):

- **evomerge**: the search of ``examples/real_llm.yaml`` (TIES per 4-layer block of the
  three specialists) with the Ray executor, one torch thread per worker, Pareto members
  written as the search keeps them. Steady state, as ``bench search`` measures it: from
  the first candidate dispatched to the last result, after actor start-up and one warm-up
  job per worker. ``outside_fraction`` is the share of worker time spent outside merge
  and evaluate.
- **the mergekit loop**: for each of the first ``--loop-candidates`` recipes the search
  scored, in one process with every core: ``mergekit-yaml`` (in its own environment, as
  ``make parity`` installs it) writes the merged model to disk, ``from_pretrained`` loads
  it, the same evaluators (built once, as a loop would keep them) score it, the folder is
  deleted. Its scores are compared with evomerge's on the same recipe: the two merges
  agree to float rounding, so the accuracies should match.

Candidates per hour of each and their ratio are printed from the same run. The loop's
time splits into mergekit (process start, loading, merging, writing), loading and
evaluating; the last is the floor both sides share, so the ratio shrinks as the
evaluation grows (``--limit``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from evomerge.errors import ConfigError

#: where ``make parity`` installs mergekit (its own environment)
DEFAULT_MERGEKIT = Path(".venv-mergekit/bin/mergekit-yaml")
#: the search space of examples/real_llm.yaml
SEARCH_SPACE = "ties_blockwise"


def bench_search_real(
    *,
    family: Path,
    trials: int = 24,
    workers: int = 2,
    optimizer: str = "cma",
    limit: Optional[int] = 50,
    loop_candidates: int = 4,
    mergekit: Path = DEFAULT_MERGEKIT,
    workdir: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run both sides; returns the table as a dict (see the module docstring)."""
    from evomerge.bench.quality import check_optimizers
    from evomerge.bench.search import _measure, bench_workdir, local_ray
    from evomerge.zoo import load_zoo

    check_optimizers([optimizer], flag="--optimizer")
    if workers < 1:
        raise ConfigError(f"--workers: expected one worker count of at least 1 with --real, got {workers}")
    if trials < 1 or loop_candidates < 1:
        raise ConfigError(f"--trials and --loop-candidates must be at least 1, got {trials} and {loop_candidates}")
    if loop_candidates > trials:
        raise ConfigError(f"--loop-candidates ({loop_candidates}) must not exceed --trials ({trials}): the loop merges the search's recipes")
    mergekit = Path(mergekit)
    if not (mergekit.is_file() and os.access(mergekit, os.X_OK)):
        raise ConfigError(f"--mergekit: {mergekit} is not an executable mergekit-yaml (`make parity` installs mergekit 0.1.5 in .venv-mergekit)")
    z = load_zoo(family, quiet=True)
    if z is None or not z.manifest.get("real"):
        raise ConfigError(f"--real: {family} holds no complete real family (build it with `evomerge zoo --real {family}` or `make real-zoo`)")

    with bench_workdir(workdir, "evomerge-bench-search-real-") as workdir:
        cfg = _config(z, workdir, trials=trials, optimizer=optimizer, limit=limit)
        with local_ray():
            ours = _measure(cfg, workdir, "ray", workers, 1.0, progress, name="real")
        loop = _mergekit_loop(Path(ours["run_dir"]), workdir / "loop", mergekit, loop_candidates, progress)
    ours_per_hour = 60.0 * ours["candidates_per_minute"]
    return {
        "family": str(z.root),
        "skills": list(z.skills),
        "search_space": SEARCH_SPACE,
        "optimizer": optimizer,
        "limit": limit,
        "cpu_count": os.cpu_count(),
        "evomerge": {**{k: v for k, v in ours.items() if k != "run_dir"}, "candidates_per_hour": ours_per_hour},
        "mergekit_loop": loop,
        "ratio": ours_per_hour / loop["candidates_per_hour"] if loop["candidates_per_hour"] else 0.0,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _config(z: Any, workdir: Path, *, trials: int, optimizer: str, limit: Optional[int]) -> Path:
    """examples/real_llm.yaml on this family (bench quality's search config with its space):
    validation only, since the loop scores no held-out split either."""
    from evomerge.bench.quality import search_config, write_config

    data = search_config(z, z.skills, optimizer=optimizer, trials=trials, limit=limit, search_space=SEARCH_SPACE)
    for e in data["evaluators"]:
        e["holdout_split"] = None
    del data["budget"]["holdout_share"]
    return write_config(data, workdir, "real_search")


def _mergekit_loop(run_dir: Path, folder: Path, mergekit: Path, n: int, progress: bool) -> dict[str, Any]:
    """mergekit-yaml, from_pretrained and the same evaluators on the search's first ``n``
    scored recipes, one after the other, on every core."""
    import torch

    from evomerge import record
    from evomerge.evaluate import build_evaluator, load_model
    from evomerge.merge.recipe import Recipe
    from evomerge.run.api import open_search

    run = open_search(run_dir)
    done = [t for t in run.load_study().trials if record.scores(t) is not None and record.get(t, "recipe") is not None]
    done.sort(key=lambda t: t.number)
    if len(done) < n:
        raise RuntimeError(f"the search scored {len(done)} candidates; the loop needs {n}")
    specs = run.worker_spec().evaluators
    evaluators = [(e.name, build_evaluator(e.preset, split=e.split, **e.options), e.limit) for e in specs]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for i, trial in enumerate(done[:n]):
            if progress:
                print(f"bench search: mergekit loop, candidate {i + 1}/{n} (trial {trial.number}) ...", flush=True)
            recipe = {k: v for k, v in record.get(trial, "recipe").items() if k != "random_seed"}  # evomerge's own key
            path = folder / f"candidate_{i}.yaml"
            path.write_text(Recipe.from_dict(recipe).to_yaml())
            out = folder / f"candidate_{i}"
            t0 = time.perf_counter()
            proc = subprocess.run([str(mergekit), str(path), str(out), "--copy-tokenizer", "--no-write-model-card"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"mergekit-yaml failed on {path} (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            t1 = time.perf_counter()
            model, tokenizer = load_model(out)  # from_pretrained, float32, eval mode
            t2 = time.perf_counter()
            scores = {}
            for name, ev, limit in evaluators:
                scores.update({f"{name}/{k}": float(v) for k, v in ev.evaluate(model, tokenizer, limit=limit).items()})
            t3 = time.perf_counter()
            del model
            shutil.rmtree(out)
            t4 = time.perf_counter()
            theirs = record.scores(trial)
            rows.append({
                "trial": trial.number,
                "mergekit_seconds": t1 - t0,
                "load_seconds": t2 - t1,
                "eval_seconds": t3 - t2,
                "cleanup_seconds": t4 - t3,
                "seconds": t4 - t0,
                "scores": scores,
                "max_score_difference": max(abs(scores[k] - theirs[k]) for k in scores if k in theirs),
            })
    finally:
        torch.set_num_threads(threads_before)
    total = sum(r["seconds"] for r in rows)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "candidates": len(rows),
        "threads": os.cpu_count() or 1,
        "seconds": total,
        "candidates_per_hour": 3600.0 * len(rows) / total if total else 0.0,
        "mergekit_seconds": mean("mergekit_seconds"),
        "load_seconds": mean("load_seconds"),
        "eval_seconds": mean("eval_seconds"),
        "outside_fraction": 1.0 - sum(r["eval_seconds"] for r in rows) / total if total else 0.0,
        "max_score_difference": max(r["max_score_difference"] for r in rows),
        "rows": rows,
    }


def format_table(r: dict[str, Any]) -> str:
    ours, loop = r["evomerge"], r["mergekit_loop"]
    per = "all" if r["limit"] is None else str(r["limit"])
    lines = [
        f"bench search --real: {r['family']} ({', '.join(r['skills'])}), {r['search_space']}, {r['optimizer']}; "
        f"{per} validation examples per skill and candidate; {r['cpu_count']} CPUs",
        f"{'side':<16} {'candidates':>10} {'cand/hour':>10} {'merge s':>8} {'load s':>7} {'eval s':>7} {'outside':>8}",
        f"{'evomerge ray x' + str(ours['workers']):<16} {ours['candidates']:>10} {ours['candidates_per_hour']:>10.1f} "
        f"{ours['merge_seconds'] / max(1, ours['candidates']):>8.2f} {'-':>7} "
        f"{(ours['busy_seconds'] - ours['merge_seconds']) / max(1, ours['candidates']):>7.2f} {100 * ours['outside_fraction']:>7.1f}%",
        f"{'mergekit loop':<16} {loop['candidates']:>10} {loop['candidates_per_hour']:>10.1f} {loop['mergekit_seconds']:>8.2f} "
        f"{loop['load_seconds']:>7.2f} {loop['eval_seconds']:>7.2f} {100 * loop['outside_fraction']:>7.1f}%",
        f"evomerge: {r['ratio']:.2f}x the candidates per hour of the mergekit-yaml loop (target >= 5); "
        f"time outside merge and evaluate {100 * ours['outside_fraction']:.1f}% (target < 10%)",
        f"  evomerge's merge and eval seconds are per candidate on one worker of {ours['threads_per_worker']} thread; "
        f"the loop's on {loop['threads']} threads; Pareto members written: {ours.get('members_written', 0)}",
        f"same recipes, same evaluators: largest score difference between the loop and evomerge {loop['max_score_difference']:.4f}",
    ]
    if (ours.get("other_cpu_fraction") or 0) > 0.1:
        lines.append("warning: other processes used more than 10% of the CPUs during the timed search; its figures are skewed")
    return "\n".join(lines)
