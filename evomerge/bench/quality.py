"""``evomerge bench quality``: searched merges against the usual recipes, on held-out data.

On the offline zoo, for two skills (default ``reverse`` and ``count``), the table holds the
exact-match accuracy on the **test** split of:

- each specialist and the base model;
- the uniform average of the specialists (a linear merge with equal weights);
- task arithmetic with the best single lambda of a 0.1-step grid (0.1 to 1.0);
- TIES and DARE-TIES with mergekit's defaults (``weight`` 1 for every model, which
  mergekit requires; ``density`` 1, mergekit's default, which makes DARE-TIES the same
  merge as TIES) and with the density people use in practice (0.5);
- per search: the members of its Pareto front that are best on each skill and best on
  the mean, each read from ``pareto.json`` (held-out scores recorded by the search).

Everything that is *chosen* (the grid's lambda, which front member is "best") is chosen
on the validation split and then reported on test, as a user should do: a merge tuned on
the numbers it is reported with would overstate itself. Margins are the best searched
mean minus each reference mean, whatever their sign.

Example (about two minutes on two cores once the zoo exists)::

    evomerge bench quality --optimizers nsga2,cma --trials 100 --json
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

#: the two skills of the demo and of this benchmark: merging them well needs per-layer weights
DEFAULT_SKILLS = ("reverse", "count")
#: task arithmetic's lambda grid (step 0.1)
LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
#: what each search looks like (the demo uses the same)
SEARCH_SPACE = "ties_layerwise"
#: the same over the zoo's LoRA specialists (``--lora``)
LORA_SEARCH_SPACE = "lora_ties_layerwise"
OPTIMIZER_OPTIONS = {"nsga2": {"population_size": 10}, "nsga3": {"population_size": 10}, "cma": {"popsize": 8}}


# ----------------------------------------------------------------------------- configs
def search_config(
    zoo: Any,
    skills: Sequence[str] = DEFAULT_SKILLS,
    *,
    optimizer: str = "nsga2",
    trials: int = 100,
    workers: int = 1,
    executor: str = "serial",
    seed: int = 0,
    keep_pareto_models: bool = True,
    limit: Optional[int] = None,
    specialists: Optional[dict[str, Path]] = None,
    search_space: Optional[str] = None,
) -> dict[str, Any]:
    """The run config of a zoo search over ``skills``: searched on validation, front re-scored on test.
    ``specialists``: skill -> source folder (default the zoo's full fine-tunes; LoRA adapters
    with :data:`LORA_SEARCH_SPACE`); ``search_space``: a preset instead of the default."""
    folders = specialists or zoo.models
    lora = specialists is not None and specialists is not zoo.models
    data: dict[str, Any] = {
        "sources": {"base_model": str(zoo.base), "models": [str(folders[s]) for s in skills]},
        "search_space": search_space or (LORA_SEARCH_SPACE if lora else SEARCH_SPACE),
        "evaluators": [{"preset": zoo.preset(s), "name": s, "split": "validation", "holdout_split": "test", "limit": limit} for s in skills],
        "objectives": [{"metric": f"{s}/accuracy", "direction": "maximize"} for s in skills],
        "optimizer": {"name": optimizer, "options": dict(OPTIMIZER_OPTIONS.get(optimizer, {}))},
        "budget": {"trials": trials, "holdout_share": 1.0},  # the held-out table reads every member chosen on validation
        "seed": seed,
        "executor": {"kind": executor, "workers": workers},
        "keep_pareto_models": keep_pareto_models,
    }
    if optimizer in ("cma", "cmaes"):  # single-objective: the mean accuracy
        data["scalarization"] = {"kind": "weighted_sum", "weights": [1.0 / len(skills)] * len(skills)}
    return data


def write_config(data: dict[str, Any], folder: Path, name: str) -> Path:
    """Write a run config where :func:`evomerge.run.create` can read it (paths in it are absolute)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return Path(tmp)


# ----------------------------------------------------------------------------- baselines
def _linear(models: Sequence[Path]) -> dict[str, Any]:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], "dtype": "float32"}


def _task_vectors(method: str, base: Path, models: Sequence[Path], **params: float) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(params)} for m in models],
        "dtype": "float32",
        "random_seed": 0,
    }


def baseline_rows(
    zoo: Any,
    skills: Sequence[str] = DEFAULT_SKILLS,
    *,
    progress: bool = True,
    limit: Optional[int] = None,
    specialists: Optional[dict[str, Path]] = None,
) -> list[dict[str, Any]]:
    """Score the reference models and merges; one row each (test scores, validation where chosen on it).
    ``specialists``: skill -> source folder (full fine-tunes or LoRA adapters; default the zoo's)."""
    from evomerge.errors import EvaluationError
    from evomerge.worker import EvaluatorSpec, Job, Worker, WorkerSpec

    folders = specialists or zoo.models
    specialists = [folders[s] for s in skills]
    spec = WorkerSpec(
        models=(str(zoo.base), *map(str, specialists)),
        base_model=str(zoo.base),
        evaluators=tuple(EvaluatorSpec(zoo.preset(s), s, "validation", "test", limit, {}) for s in skills),
    )
    before_grid: list[tuple[str, str, str, dict]] = [
        *[(f"specialist {s}", "specialist", "", _linear([folders[s]])) for s in skills],
        ("base", "base", "", _linear([zoo.base])),
        ("uniform average", "baseline", "linear, equal weights", _linear(specialists)),
    ]
    after_grid: list[tuple[str, str, str, dict]] = [
        ("TIES (mergekit defaults)", "baseline", "weight 1, density 1", _task_vectors("ties", zoo.base, specialists, weight=1.0, density=1.0)),
        ("TIES", "baseline", "weight 1, density 0.5", _task_vectors("ties", zoo.base, specialists, weight=1.0, density=0.5)),
        ("DARE-TIES", "baseline", "weight 1, density 0.5", _task_vectors("dare_ties", zoo.base, specialists, weight=1.0, density=0.5)),
    ]
    grid = [(lam, _task_vectors("task_arithmetic", zoo.base, specialists, weight=lam)) for lam in LAMBDA_GRID]
    bar = _bar(progress, len(before_grid) + len(grid) + 1 + len(after_grid), "baselines")
    worker = Worker(spec, worker_id="baselines")

    def score(recipe: dict, kind: str) -> dict[str, float]:
        result = worker.run(Job(0, recipe, kind=kind))  # type: ignore[arg-type]
        bar.advance()
        if result.error:
            raise EvaluationError(f"baseline {recipe['merge_method']}: {result.error}")
        return {s: result.scores[f"{s}/accuracy"] for s in skills}

    try:
        rows = [_row(name, kind, detail, score(recipe, "holdout")) for name, kind, detail, recipe in before_grid]
        # the grid's lambda is chosen on validation, then reported on test
        on_validation = [(lam, score(recipe, "full"), recipe) for lam, recipe in grid]
        lam, val, recipe = max(on_validation, key=lambda x: (_mean(x[1]), -x[0]))
        detail = f"best lambda {lam:g} of {LAMBDA_GRID[0]:g}..{LAMBDA_GRID[-1]:g} (step 0.1)"
        rows.append(_row("task arithmetic", "baseline", detail, score(recipe, "holdout"), val))
        rows[-1]["grid"] = {f"{lam:g}": round(_mean(v), 4) for lam, v, _ in on_validation}
        rows.extend(_row(name, kind, detail, score(recipe, "holdout")) for name, kind, detail, recipe in after_grid)
    finally:
        bar.close()
    return rows


# ----------------------------------------------------------------------------- searched
def searched_rows(run_dir: Path, skills: Sequence[str], label: str) -> list[dict[str, Any]]:
    """The front members best on each skill and best on the mean (chosen on validation)."""
    import json

    members = json.loads((Path(run_dir) / "pareto.json").read_text())["members"]
    members = [m for m in members if m.get("holdout_values")]
    if not members:
        return []

    def val(m: dict) -> dict[str, float]:
        return {s: m["values"][f"{s}/accuracy"] for s in skills}

    def test(m: dict) -> dict[str, float]:
        return {s: m["holdout_values"][f"{s}/accuracy"] for s in skills}

    picks: list[tuple[str, dict]] = [("best mean", max(members, key=lambda m: (_mean(val(m)), -m["trial"])))]
    for s in skills:
        picks.append((f"best {s}", max(members, key=lambda m: (val(m)[s], _mean(val(m)), -m["trial"]))))
    rows = []
    for what, m in picks:
        row = _row(f"{label}: {what}", "searched", f"trial {m['trial']}", test(m), val(m))
        row.update(trial=m["trial"], path=m.get("path"))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- table
def quality_table(rows: list[dict[str, Any]], skills: Sequence[str]) -> dict[str, Any]:
    """Rows plus the margins of the best searched mean over each reference row (on test)."""
    searched = [r for r in rows if r["kind"] == "searched" and r["name"].endswith("best mean")]
    result: dict[str, Any] = {"skills": list(skills), "split": "test", "rows": rows, "margins": {}}
    if searched:
        best = max(searched, key=lambda r: r["mean"])
        result["best_searched"] = best["name"]
        for r in rows:
            if r["kind"] in ("baseline", "base", "specialist"):
                result["margins"][r["name"]] = round(best["mean"] - r["mean"], 4)
        # a searched mean above every merge baseline: what the demo sets out to show
        result["beats_baselines"] = all(result["margins"][r["name"]] > 0 for r in rows if r["kind"] == "baseline")
    return result


def format_table(result: dict[str, Any]) -> str:
    skills = result["skills"]
    width = max(len(r["name"]) for r in result["rows"]) + 2
    head = f"{'model':<{width}}" + "".join(f"{s:>9}" for s in skills) + f"{'mean':>9}  {'margin':>7}  detail"
    what = ", LoRA specialists" if result.get("sources") == "lora" else ""
    lines = [f"held-out {result['split']} accuracy, {len(result['skills'])} skills{what}; choices made on validation", head, "-" * len(head)]
    for r in result["rows"]:
        margin = result["margins"].get(r["name"])
        m = "" if margin is None else f"{margin:+.3f}"
        lines.append(f"{r['name']:<{width}}" + "".join(f"{r['test'][s]:>9.3f}" for s in skills) + f"{r['mean']:>9.3f}  {m:>7}  {r['detail']}")
    if "best_searched" in result:
        lines.append(f"margin: mean of '{result['best_searched']}' minus the row's mean (positive: the search is better)")
    for opt, p in result.get("per_optimizer", {}).items():
        verdict = "beats every merge baseline" if p["beats_baselines"] else "does NOT beat every merge baseline"
        lines.append(f"{opt}: best mean {p['test_mean']:.3f} {verdict}: " + ", ".join(f"{k} {v:+.3f}" for k, v in p["margins"].items()))
    return "\n".join(lines)


def _row(name: str, kind: str, detail: str, test: dict[str, float], validation: Optional[dict[str, float]] = None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "kind": kind, "detail": detail, "test": test, "mean": round(_mean(test), 4)}
    if validation is not None:
        row["validation"] = validation
        row["validation_mean"] = round(_mean(validation), 4)
    return row


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


class _bar:
    """A progress task of ``total`` steps, reported as evomerge.progress events."""

    def __init__(self, enabled: bool, total: int, label: str):
        from evomerge.progress import task

        self._task, self._done = task(label, total, enabled=enabled).__enter__(), 0

    def advance(self) -> None:
        self._done += 1
        self._task.advance(self._done)

    def close(self) -> None:
        self._task.__exit__(None, None, None)


# ----------------------------------------------------------------------------- benchmark
def check_optimizers(optimizers: Sequence[str], *, flag: str = "--optimizers") -> None:
    """ConfigError unless every name is a registered optimizer, each named once."""
    from evomerge.errors import ConfigError
    from evomerge.optimize import OPTIMIZERS

    if not optimizers:
        raise ConfigError(f"{flag}: give at least one optimizer")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ConfigError(f"{flag}: unknown optimizer {name!r} (known: {', '.join(sorted(OPTIMIZERS))})")
    dup = next((n for n in optimizers if list(optimizers).count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{flag}: {dup} is named twice; each optimizer runs one search")


def bench_quality(
    *,
    zoo_dir: Path = Path("zoo"),
    skills: Sequence[str] = DEFAULT_SKILLS,
    optimizers: Sequence[str] = ("nsga2", "cma"),
    trials: int = 100,
    executor: str = "serial",
    workers: int = 1,
    seed: int = 0,
    runs_dir: Optional[Path] = None,
    limit: Optional[int] = None,
    lora: bool = False,
    search_space: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Baselines, then one search per optimizer; the table as a dict (see the module docstring).
    ``lora``: the sources are the zoo's LoRA specialists (trained once, see :mod:`evomerge._zoo_lora`)."""
    import time

    from evomerge.run.api import create
    from evomerge.zoo import load_zoo, zoo

    check_optimizers(optimizers)  # before the baselines are scored for nothing
    if search_space is not None:
        from evomerge._presets import resolve_preset

        resolve_preset(search_space, "search_spaces")
    z = load_zoo(zoo_dir, quiet=True)  # the demo zoo, or the real family (evomerge zoo --real)
    if z is None:
        check_skills(None, skills)  # before a zoo is built for nothing
        z = zoo(zoo_dir, progress=progress)
    check_skills(z, skills)
    specialists = None
    if lora:
        from evomerge._zoo_lora import lora_zoo

        specialists = lora_zoo(z, report=print if progress else None)
    tmp = None
    if runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="evomerge-bench-quality-")
        runs_dir = Path(tmp.name)
    try:
        rows = baseline_rows(z, skills, progress=progress, limit=limit, specialists=specialists)
        searches = {}
        for opt in optimizers:
            name = f"quality-{opt}-{time.strftime('%Y%m%d-%H%M%S')}"
            data = search_config(z, skills, optimizer=opt, trials=trials, workers=workers, executor=executor, seed=seed, keep_pareto_models=False, limit=limit,
                                 specialists=specialists, search_space=search_space)
            path = write_config(data, Path(runs_dir), name)
            try:
                run = create(path, runs_dir=Path(runs_dir), name=name)
            finally:
                path.unlink()
            summary = run.run(progress=progress)
            searches[opt] = {k: summary[k] for k in ("n_complete", "n_failed", "elapsed_seconds")}
            rows.extend(searched_rows(run.run_dir, skills, opt))
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = quality_table(rows, skills)
    result.update(zoo=str(z.root), sources="lora" if lora else "full", search_space=data["search_space"], limit=limit, trials=trials, optimizers=list(optimizers), seed=seed, executor=executor, workers=workers, searches=searches)
    result["per_optimizer"] = {opt: _margins(rows, f"{opt}: best mean") for opt in optimizers}
    return result


def _margins(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One searched row's test mean and its margin over every merge baseline."""
    row = _by_name(rows, name)
    margins = {r["name"]: round(row["mean"] - r["mean"], 4) for r in rows if r["kind"] == "baseline"}
    return {"test_mean": row["mean"], "trial": row.get("trial"), "margins": margins, "beats_baselines": all(m > 0 for m in margins.values())}


def _by_name(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in rows if r["name"] == name)


def check_skills(z: Any, skills: Sequence[str], *, flag: str = "--skills", at_least: int = 2) -> None:
    """``at_least`` different skills, each one the zoo has; one line otherwise.

    ``z`` None checks the names against every skill a zoo can have, before one is built.
    """
    from evomerge._zoo_data import SKILLS
    from evomerge.errors import ConfigError

    if len(skills) < at_least or len(set(skills)) != len(skills):
        raise ConfigError(f"{flag}: give two or more different skills, got {','.join(skills) or 'none'}")
    known, where = (list(SKILLS), "a zoo skill") if z is None else (z.skills, f"a skill of the zoo in {z.root}")
    unknown = [s for s in skills if s not in known]
    if unknown:
        raise ConfigError(f"{flag}: {unknown[0]!r} is not {where} (it has {', '.join(known)})")
