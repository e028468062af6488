"""One record per trial: what a search writes on a trial and how it is read back.

Every fact about a trial that is not Optuna's own (params, values, state) is a user
attribute written through :func:`write` and read through :func:`scores`,
:func:`objective_values` and :func:`get`; nothing else in the package names those
attributes. Scores are stored once: ``scores`` holds every metric of the full
evaluation, ``screen_scores`` those of the low-fidelity screening of a PRUNED trial,
``holdout_scores`` those of the held-out split; the per-objective values are read
out of them, never stored beside them.

A trial is re-scored on the held-out split after it is COMPLETE (and Optuna keeps a
finished trial's attributes fixed), so those scores are study user attributes named
:func:`holdout_key`; :func:`holdout_scores` reads them (or the trial's own attribute,
where runs of an earlier version kept them).

Example:
    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study()
    >>> trial = study.ask()
    >>> write(trial, scores={"add/accuracy": 0.5, "add/loss": 2.0}, merge_seconds=0.1)
    >>> _ = study.tell(trial, 0.5)
    >>> t = study.trials[0]
    >>> objective_values(t, ["add/loss", "add/accuracy"]), get(t, "merge_seconds")
    ([2.0, 0.5], 0.1)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

#: The attributes of a trial's record, and what each holds.
FIELDS: dict[str, str] = {
    "recipe": "the mergekit recipe the candidate is (a dict)",
    "scores": "every metric of the full evaluation",
    "screen_scores": "every metric of the screening (low fidelity)",
    "screen_fidelity": "the limit the screening ran with",
    "holdout_scores": "every metric on the held-out split (runs of earlier versions; now a study attribute)",
    "fidelity": "'full' once fully scored",
    "merge_seconds": "seconds the worker spent merging (full evaluation)",
    "eval_seconds": "seconds the worker spent evaluating (full evaluation)",
    "write_seconds": "seconds the worker spent writing the trial's front-member folder",
    "worker_id": "the worker of the full evaluation",
    "worker_id_screen": "the worker of the screening",
    "worker_id_holdout": "the worker of the held-out scoring",
    "hypervolume": "the front's hypervolume once this trial was told",
    "error": "why the trial failed",
    "failed_stage": "the stage (screen, full, holdout) it failed in",
    "baseline": "the baseline or seed recipe it is, if any",
    "requeued_from": "the crashed trial whose candidate it asks again",
}


HOLDOUT_PREFIX = "holdout_scores/"


def holdout_key(number: int) -> str:
    """The study user attribute holding trial ``number``'s held-out scores.

    >>> holdout_key(12)
    'holdout_scores/12'
    """
    return f"{HOLDOUT_PREFIX}{number}"


def holdouts(study_attrs: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """Every trial's held-out scores, from the study's user attributes.

    >>> holdouts({"holdout_scores/3": {"a": 0.5}, "reference_point": [0.1]})
    {3: {'a': 0.5}}
    """
    return {int(k[len(HOLDOUT_PREFIX) :]): v for k, v in study_attrs.items() if k.startswith(HOLDOUT_PREFIX)}


def write_holdout(study: Any, number: int, scores: Mapping[str, float]) -> None:
    """Store trial ``number``'s held-out scores (the trial may be finished)."""
    study.set_user_attr(holdout_key(number), dict(scores))


def holdout_scores(trial: Any, held: Mapping[int, Mapping[str, float]]) -> Optional[dict[str, float]]:
    """The trial's held-out scores: from ``held`` (:func:`holdouts`), else its own record."""
    found = held.get(trial.number)
    return dict(found) if found is not None else trial.user_attrs.get("holdout_scores")


def write(trial: Any, **fields: Any) -> None:
    """Set record fields on a live trial (``optuna.trial.Trial``); None values are skipped."""
    for key, value in fields.items():
        if key not in FIELDS:
            raise KeyError(f"{key!r} is not a field of a trial record (fields: {', '.join(FIELDS)})")
        if value is not None:
            trial.set_user_attr(key, value)


def get(trial: Any, key: str, default: Any = None) -> Any:
    """One record field of a trial (frozen or live)."""
    if key not in FIELDS:
        raise KeyError(f"{key!r} is not a field of a trial record")
    return trial.user_attrs.get(key, default)


def scores(trial: Any) -> Optional[dict[str, float]]:
    """The scores the trial was judged by: the full evaluation, else the screening."""
    attrs = trial.user_attrs
    found = attrs.get("scores")
    if found is None:
        found = attrs.get("screen_scores")
    return found


def objective_values(trial: Any, metrics: Sequence[Any]) -> Optional[list[float]]:
    """The trial's value of each objective (metric names or objects with ``.metric``), or None."""
    found = scores(trial)
    return pick(found, metrics)


def pick(found: Optional[Mapping[str, float]], metrics: Sequence[Any]) -> Optional[list[float]]:
    """``found[m]`` for each metric, or None when one is missing."""
    if not found:
        return None
    names = [getattr(m, "metric", m) for m in metrics]
    if not all(n in found for n in names):
        return None
    return [float(found[n]) for n in names]
