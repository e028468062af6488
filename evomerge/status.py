"""``evomerge status``: what a run holds, from its study (safe while the search writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from evomerge.pareto import HOLDOUT_ATTR, OBJECTIVES_ATTR, ParetoArchive, hypervolume


def status(run_dir: Path, *, storage: Optional[str] = None) -> dict[str, Any]:
    """Counts by state, best per objective, the front, hypervolume, throughput, time split."""
    from optuna.trial import TrialState

    from evomerge.study import SearchRun

    run = SearchRun.open(run_dir, storage=storage)
    study = run.load_study()
    trials = study.get_trials(deepcopy=False)
    archive = ParetoArchive(run.run_dir, run.objectives)
    front = archive.front(trials)
    done = [t for t in trials if t.state == TrialState.COMPLETE and OBJECTIVES_ATTR in t.user_attrs]
    best = {}
    for i, o in enumerate(run.objectives):
        vals = [t.user_attrs[OBJECTIVES_ATTR][i] for t in done]
        if vals:
            best[o.metric] = max(vals) if o.direction == "maximize" else min(vals)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in done if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    merge_s = sum(t.user_attrs.get("merge_seconds", 0.0) for t in done)
    eval_s = sum(t.user_attrs.get("eval_seconds", 0.0) for t in done)
    ref = run.config.reference_point or study.user_attrs.get("reference_point")
    count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
    return {
        "study": run.name,
        "run_dir": str(run.run_dir),
        "n_complete": count(TrialState.COMPLETE),
        "n_failed": count(TrialState.FAIL),
        "n_pruned": count(TrialState.PRUNED),
        "n_running": count(TrialState.RUNNING),
        "n_waiting": count(TrialState.WAITING),
        "budget": run.config.budget.model_dump(),
        "objectives": [{"name": o.metric, "direction": o.direction} for o in run.objectives],
        "best": best,
        "pareto": [
            {
                "trial": t.number,
                "values": t.user_attrs[OBJECTIVES_ATTR],
                "holdout_values": [t.user_attrs[HOLDOUT_ATTR].get(o.metric) for o in run.objectives] if t.user_attrs.get(HOLDOUT_ATTR) else None,
                "path": str(archive.dir / str(t.number)),
            }
            for t in front
        ],
        "hypervolume": hypervolume([t.user_attrs[OBJECTIVES_ATTR] for t in front], run.objectives, ref) if ref else 0.0,
        "trials_per_hour": len(done) / span * 3600 if span > 0 else None,
        "merge_seconds": merge_s,
        "eval_seconds": eval_s,
        "errors": grouped_errors([(t.number, t.user_attrs.get("error", "no error recorded")) for t in trials if t.state == TrialState.FAIL]),
    }


def grouped_errors(errors: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Distinct errors of failed trials, most frequent first, with the trials each hit.

    >>> grouped_errors([(3, "boom"), (4, "nan"), (5, "boom")])
    [{'error': 'boom', 'trials': [3, 5]}, {'error': 'nan', 'trials': [4]}]
    """
    groups: dict[str, list[int]] = {}
    for number, error in errors:
        groups.setdefault(error, []).append(number)
    return [{"error": e, "trials": t} for e, t in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def format_errors(groups: list[dict[str, Any]], most: int = 3) -> list[str]:
    """One line per distinct error, the most frequent first.

    >>> format_errors([{"error": "boom", "trials": [0, 1, 2, 5]}, {"error": "nan", "trials": [4]}])
    ['4 trials failed (0-2, 5): boom', '1 trial failed (4): nan']
    """
    lines = []
    for g in groups[:most]:
        n = len(g["trials"])
        lines.append(f"{n} trial{'s' if n != 1 else ''} failed ({trial_ranges(g['trials'])}): {g['error']}")
    if len(groups) > most:
        lines.append(f"... and {len(groups) - most} other errors (evomerge status --json lists them all)")
    return lines


def trial_ranges(trials: list[int], most: int = 4) -> str:
    """Trial numbers in short: runs of consecutive numbers as ranges.

    >>> trial_ranges([0, 1, 2, 3, 7, 9, 10]), trial_ranges(list(range(0, 20, 2)), most=3)
    ('0-3, 7, 9-10', '0, 2, 4 and 7 more')
    """
    runs: list[list[int]] = []
    for n in sorted(trials):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    parts = [f"{a}-{b}" if b > a else str(a) for a, b in runs]
    return ", ".join(parts[:most]) + (f" and {len(parts) - most} more" if len(parts) > most else "")


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
    lines.append(f"Pareto front ({len(s['pareto'])}):")
    for m in s["pareto"]:
        vals = "  ".join(f"{n}={v:.4g}" for n, v in zip(names, m["values"]))
        held = ""
        if m["holdout_values"]:
            held = "  held-out " + "  ".join(f"{n}={v:.4g}" for n, v in zip(names, m["holdout_values"]) if v is not None)
        lines.append(f"  trial {m['trial']:4d}  {vals}{held}  {m['path']}")
    lines += format_errors(s.get("errors", []))
    return "\n".join(lines)
