"""``evomerge export``: one trial's merged model as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from evomerge.errors import MergeError
from evomerge.io import check_output_folder


def export(run_dir: Path, trial: Union[int, str], out: Path, *, overwrite: bool = False, storage: Optional[str] = None) -> dict:
    """Write one trial's merged model (any trial of the study, not only front members).

    ``trial="best"`` picks the Pareto front member with the highest mean of its objective
    values (each sign-adjusted so that higher is better), as the report plots do.
    """
    from optuna.trial import TrialState

    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.recipe import Recipe
    from evomerge.pareto import RECIPE_ATTR
    from evomerge.study import SearchRun

    check_output_folder(Path(out), overwrite)
    run = SearchRun.open(run_dir, storage=storage)
    study = run.load_study()
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial == "best":
        from evomerge.pareto import Constraint, ParetoArchive, best_mean

        constraints = [Constraint(c.metric, c.min, c.max) for c in run.config.constraints]
        best = best_mean(ParetoArchive(run.run_dir, run.objectives, constraints=constraints).front(list(trials.values())), run.objectives)
        if best is None:
            raise MergeError(f"run {run.name} has no complete trial yet; nothing to export")
        trial = best.number
    if trial not in trials:
        raise MergeError(f"run {run.name} has no trial {trial} (trials 0 to {max(trials, default=-1)})")
    t = trials[trial]
    if RECIPE_ATTR not in t.user_attrs:
        raise MergeError(f"trial {trial} has no recipe (state {t.state.name})")
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        why = f" ({t.user_attrs['error']})" if t.user_attrs.get("error") else ""
        raise MergeError(f"trial {trial} is {t.state.name}{why}, not a scored candidate")
    engine = MergeEngine(run.sources)
    return dict(engine.write(Recipe.from_dict(t.user_attrs[RECIPE_ATTR]), Path(out), overwrite=overwrite), trial=trial)
