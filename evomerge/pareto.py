"""The Pareto front of a run: computed from the study, kept on disk as model folders.

``runs/<name>/pareto/<trial>/`` holds a ready-to-load Hugging Face folder for every
member of the current front and ``pareto.json`` lists them (trial, values, held-out
values, recipe, path). :meth:`ParetoArchive.sync` brings the folder in line with the
study: a new member is written atomically (temp folder, then rename), a member that
became dominated is renamed away and deleted, and ``pareto.json`` is replaced in one
rename. A reader never sees a partial folder.

The front holds the non-dominated COMPLETE trials that meet the constraints; among
trials with exactly the same objective values only the earliest is kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from evomerge import record
from evomerge.io import write_json_atomic
from evomerge.objective import Objective, dominated_by_front, losses


@dataclass(frozen=True)
class Constraint:
    metric: str
    min: Optional[float] = None
    max: Optional[float] = None

    def ok(self, scores: dict[str, float]) -> bool:
        v = scores.get(self.metric)
        if v is None:
            return False
        return (self.min is None or v >= self.min) and (self.max is None or v <= self.max)


def front_indices(values: Sequence[Sequence[float]], objectives: Sequence[Objective]) -> list[int]:
    """Indices of the non-dominated points; the first of exact duplicates only."""
    from optuna.study._multi_objective import _is_pareto_front

    if len(values) == 0:
        return []
    loss = losses(values, objectives)
    on_front = _is_pareto_front(loss, assume_unique_lexsorted=False)
    seen: set[tuple[float, ...]] = set()
    out = []
    for i in np.flatnonzero(on_front):
        key = tuple(loss[i])
        if key not in seen:
            seen.add(key)
            out.append(int(i))
    return out


def hypervolume(points: Sequence[Sequence[float]], objectives: Sequence[Objective], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded by the reference point (in objective units)."""
    from optuna._hypervolume import compute_hypervolume

    if not len(points):
        return 0.0
    loss = losses(points, objectives)
    ref = losses([reference], objectives)[0]
    inside = loss[np.all(loss < ref, axis=1)]
    if not len(inside):
        return 0.0
    return float(compute_hypervolume(inside, ref))


def best_mean(front: Sequence[Any], objectives: Sequence[Objective]) -> Any:
    """The front member with the highest mean of its sign-adjusted objective values (None if empty)."""
    ranked = ranked_by_mean(front, objectives)
    return ranked[0] if ranked else None


def ranked_by_mean(trials: Sequence[Any], objectives: Sequence[Objective]) -> list[Any]:
    """Trials by the mean of their sign-adjusted objective values, best first (ties: earliest first)."""
    signs = np.array([1.0 if o.direction == "maximize" else -1.0 for o in objectives])
    return sorted(trials, key=lambda t: -float(np.mean(np.array(record.objective_values(t, objectives)) * signs)))


class ParetoArchive:
    """Keeps ``run_dir/pareto/`` and ``run_dir/pareto.json`` equal to the study's front."""

    def __init__(
        self,
        run_dir: Path,
        objectives: Sequence[Objective],
        *,
        constraints: Sequence[Constraint] = (),
        write_model: Optional[Callable[[dict, Path], Any]] = None,
    ):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "pareto"
        self.json_path = self.run_dir / "pareto.json"
        self.objectives = list(objectives)
        self.constraints = list(constraints)
        self.write_model = write_model

    def eligible(self, trials: Sequence[Any]) -> list[Any]:
        from optuna.trial import TrialState

        out = []
        for t in trials:
            if t.state != TrialState.COMPLETE or record.objective_values(t, self.objectives) is None:
                continue
            if all(c.ok(record.get(t, "scores") or {}) for c in self.constraints):
                out.append(t)
        return out

    def front(self, trials: Sequence[Any]) -> list[Any]:
        done = sorted(self.eligible(trials), key=lambda t: t.number)
        idx = front_indices([record.objective_values(t, self.objectives) for t in done], self.objectives)
        return [done[i] for i in idx]

    def sync(self, trials: Sequence[Any], *, holdout: Optional[dict[int, dict]] = None) -> list[Any]:
        """Write missing members, drop dominated ones, rewrite pareto.json; returns the front."""
        front = self.front(trials)
        numbers = {t.number for t in front}
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.write_model is not None:
            for t in front:
                folder = self.dir / str(t.number)
                if not folder.is_dir():
                    self.write_model(record.get(t, "recipe"), folder)
        from optuna.trial import TrialState

        running = {t.number for t in trials if t.state == TrialState.RUNNING}
        for entry in self.dir.iterdir():
            if entry.name.startswith("."):
                if entry.name.startswith(".trash-") or _abandoned(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)  # leftovers of an interrupted removal or write
                continue
            if entry.name.isdigit() and int(entry.name) in running:
                continue  # a worker wrote it before its result was told
            if not entry.name.isdigit() or int(entry.name) not in numbers:
                trash = self.dir / f".trash-{entry.name}"
                os.replace(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
        members = []
        for t in front:
            held = (holdout or {}).get(t.number) or record.get(t, "holdout_scores")
            members.append(
                {
                    "trial": t.number,
                    "values": dict(zip([o.metric for o in self.objectives], record.objective_values(t, self.objectives))),
                    "holdout_values": _objective_dict(held, self.objectives) if held else None,
                    "scores": record.get(t, "scores"),
                    "holdout_scores": held,
                    "recipe": record.get(t, "recipe"),
                    "path": str(self.dir / str(t.number)) if (self.dir / str(t.number)).is_dir() else None,
                }
            )
        write_json_atomic(self.json_path, {"objectives": [o.__dict__ for o in self.objectives], "members": members})
        return front


def _abandoned(name: str) -> bool:
    """A ``.<n>.tmp-<pid>`` folder whose writer is no longer running on this machine
    (a worker writing right now keeps its folder; one killed mid-write does not)."""
    pid = name.rsplit(".tmp-", 1)[-1] if ".tmp-" in name else ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _objective_dict(scores: dict, objectives: Sequence[Objective]) -> dict:
    return {o.metric: scores.get(o.metric) for o in objectives}

