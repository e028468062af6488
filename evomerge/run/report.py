"""The report of a run: its summary, and its failures grouped for a person to read."""

from __future__ import annotations

from typing import Any, Optional

from evomerge import record
from evomerge.pareto import hypervolume


def summary(run: Any, study: Any, archive: Any, *, elapsed: float = 0.0, trials: Optional[list] = None) -> dict[str, Any]:
    """Counts by state, the front (trial, values, held-out values, path) and its hypervolume;
    ``holdout_pending``: the front members not re-scored on the held-out split yet (the run
    has held-out splits), or None (it has none)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False) if trials is None else trials
    objectives = run.objectives
    front = archive.front(trials)
    attrs = study.user_attrs if study is not None else _user_attrs(run)
    ref = run.config.reference_point or attrs.get("reference_point")
    held = record.holdouts(attrs)
    has_holdout = any(e.holdout_split for e in run.config.evaluators)
    count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
    values = lambda t: record.objective_values(t, objectives)  # noqa: E731
    return {
        "study": run.name,
        "run_dir": str(run.run_dir),
        "n_complete": count(TrialState.COMPLETE),
        "n_failed": count(TrialState.FAIL),
        "n_pruned": count(TrialState.PRUNED),
        "n_running": count(TrialState.RUNNING),
        "objectives": [{"name": o.metric, "direction": o.direction} for o in objectives],
        "pareto": [
            {
                "trial": t.number,
                "values": values(t),
                "holdout_values": _held(t, held, objectives),
                "path": str(archive.dir / str(t.number)),
            }
            for t in front
        ],
        "holdout_pending": [t.number for t in front if record.holdout_scores(t, held) is None] if has_holdout else None,
        "hypervolume": hypervolume([values(t) for t in front], objectives, ref) if ref else 0.0,
        "elapsed_seconds": elapsed,
    }


def _held(t: Any, held: dict, objectives: list) -> Optional[list]:
    scores = record.holdout_scores(t, held)
    return [scores.get(o.metric) for o in objectives] if scores else None


def _user_attrs(run: Any) -> dict[str, Any]:
    if not run.has_study():
        return {}
    return run.storage().get_study_user_attrs(run.storage().get_study_id_from_name(run.name))


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
