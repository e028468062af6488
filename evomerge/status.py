"""``evomerge status``: what a run holds, read from its study (safe while the search writes).

Reads the storage and the run folder only, through the light run handle
(:class:`evomerge.run.handle.Run`): no source weights, evaluators or GPU are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from evomerge import record
from evomerge.run.report import format_errors, grouped_errors, summary  # noqa: F401 - re-exported for the verbs


def status(run_dir: Optional[Path] = None, *, storage: Optional[str] = None, study: Optional[str] = None) -> dict[str, Any]:
    """Counts by state, best per objective, the front, hypervolume, throughput, time split.

    The run is its folder, or (``storage`` and ``study``) a study in a storage.
    """
    from optuna.trial import TrialState

    from evomerge.run.handle import Run

    if run_dir is None:
        if not (storage and study):
            from evomerge.errors import ConfigError

            raise ConfigError("name the run: its folder, or --storage URL and --study NAME")
        run = _from_storage(storage, study)
    else:
        run = Run.open(run_dir, storage=storage)
    trials = run.study().get_trials(deepcopy=False) if run.has_study() else []
    archive = run.archive()
    out = summary(run, None, archive, trials=trials)
    objectives = run.objectives
    done = [t for t in trials if t.state == TrialState.COMPLETE and record.objective_values(t, objectives) is not None]
    best = {}
    for i, o in enumerate(objectives):
        vals = [record.objective_values(t, objectives)[i] for t in done]
        if vals:
            best[o.metric] = max(vals) if o.direction == "maximize" else min(vals)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in done if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    out.pop("elapsed_seconds")
    out.update(
        n_waiting=sum(t.state == TrialState.WAITING for t in trials),
        budget=run.config.budget.model_dump(),
        best=best,
        trials_per_hour=len(done) / span * 3600 if span > 0 else None,
        merge_seconds=sum(record.get(t, "merge_seconds", 0.0) for t in done),
        eval_seconds=sum(record.get(t, "eval_seconds", 0.0) for t in done),
        errors=grouped_errors([(t.number, record.get(t, "error", "no error recorded")) for t in trials if t.state == TrialState.FAIL]),
    )
    return out


def _from_storage(storage: str, study: str) -> Any:
    """A run read straight from its storage, its folder (made where it would be resumed) untouched."""
    from evomerge.errors import ConfigError
    from evomerge.run._storage import CONFIG_ATTR, open_storage, study_id, system_attrs
    from evomerge.run.handle import Run
    from evomerge.run_config import parse_run_config

    st = open_storage(storage, Path("."))
    sid = study_id(st, study)
    frozen = None if sid is None else system_attrs(st, sid).get(CONFIG_ATTR)
    if frozen is None:
        raise ConfigError(f"storage {storage} holds no study named {study!r} made by evomerge search")
    run = Run(parse_run_config(frozen, where=f"study {study!r}"), Path("runs") / study, storage_url=storage)
    run._storage = st
    return run


def format_status(s: dict[str, Any]) -> str:
    names = [o["name"] for o in s["objectives"]]
    lines = [
        f"run {s['study']} ({s['run_dir']})",
        f"trials: {s['n_complete']} complete, {s['n_pruned']} pruned, {s['n_failed']} failed, {s['n_running']} running"
        + (f" (budget {s['budget']['trials']})" if s["budget"].get("trials") else ""),
        "best: " + (", ".join(f"{k} = {v:.4g}" for k, v in s["best"].items()) or "none yet (no trial complete)"),
        f"hypervolume: {s['hypervolume']:.4g}",
    ]
    if s["trials_per_hour"]:
        total = s["merge_seconds"] + s["eval_seconds"]
        share = f"{100 * s['merge_seconds'] / total:.0f}% merging, {100 * s['eval_seconds'] / total:.0f}% evaluating" if total else ""
        lines.append(f"throughput: {s['trials_per_hour']:.0f} trials/hour; {share}")
    pending = s.get("holdout_pending")
    lines.append(f"Pareto front ({len(s['pareto'])})" + (f"; {len(pending)} not re-scored on the held-out split yet (trials {', '.join(map(str, pending))}):" if pending else ":"))
    for m in s["pareto"]:
        vals = "  ".join(f"{n}={v:.4g}" for n, v in zip(names, m["values"]))
        held = ""
        if m["holdout_values"]:
            held = "  held-out " + "  ".join(f"{n}={v:.4g}" for n, v in zip(names, m["holdout_values"]) if v is not None)
        if pending and m["trial"] in pending:
            held = "  held-out: not re-scored yet"
        lines.append(f"  trial {m['trial']:4d}  {vals}{held}  {m['path']}")
    lines += format_errors(s.get("errors", []))
    return "\n".join(lines)
