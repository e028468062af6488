"""``evomerge export``: one trial's merged model as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from evomerge.errors import MergeError
from evomerge.io import atomic_folder, check_output_folder


def export(
    run_dir: Path,
    trial: Union[int, str],
    out: Path,
    *,
    overwrite: bool = False,
    storage: Optional[str] = None,
    adapter: bool = False,
    rank: Optional[int] = None,
) -> dict:
    """Write one trial's merged model (any trial of the study, not only front members).

    With ``adapter`` (or ``rank``), the merge is written as one PEFT LoRA adapter instead,
    merged again from the recipe: exact for a linear merge of adapters, else truncated to
    ``rank`` by SVD with its error reported (as ``evomerge merge --adapter`` does).

    ``trial="best"`` picks the Pareto front member with the highest mean of its objective
    values (each sign-adjusted so that higher is better), as the report plots do. A front
    member whose folder the run holds is copied from it (no source model needed); any
    other trial is merged again from its stored recipe.
    """
    from optuna.trial import TrialState

    from evomerge import record
    from evomerge.pareto import best_mean
    from evomerge.run.handle import Run

    check_output_folder(Path(out), overwrite)
    run = Run.open(run_dir, storage=storage)
    trials = {t.number: t for t in run.study().get_trials(deepcopy=False)} if run.has_study() else {}
    archive = run.archive()
    if trial == "best":
        best = best_mean(archive.front(list(trials.values())), run.objectives)
        if best is None:
            raise MergeError(f"run {run.name} has no complete trial yet; nothing to export")
        trial = best.number
    if trial not in trials:
        raise MergeError(f"run {run.name} has no trial {trial} (trials 0 to {max(trials, default=-1)})")
    t = trials[trial]
    recipe = record.get(t, "recipe")
    if recipe is None:
        raise MergeError(f"trial {trial} has no recipe (state {t.state.name})")
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        why = f" ({record.get(t, 'error')})" if record.get(t, "error") else ""
        raise MergeError(f"trial {trial} is {t.state.name}{why}, not a scored candidate")
    folder = archive.dir / str(trial)
    if not (adapter or rank is not None) and (folder / "config.json").is_file():
        return _copy_member(folder, Path(out), recipe, trial=trial, overwrite=overwrite)
    from evomerge.merge import merge

    return dict(merge(recipe, Path(out), allow_pickle=run.config.sources.allow_pickle, overwrite=overwrite, adapter=adapter, rank=rank), trial=trial)


def _copy_member(folder: Path, out: Path, recipe: dict, *, trial: int, overwrite: bool) -> dict:
    """A front member's folder, copied whole (atomically) instead of merged again."""
    import shutil

    with atomic_folder(out, overwrite=overwrite) as tmp:
        for f in folder.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
    n_tensors = 0
    from safetensors import safe_open

    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            n_tensors += len(list(h.keys()))
    return {"out": str(out), "merge_method": recipe.get("merge_method", "chain"), "n_tensors": n_tensors, "trial": trial, "copied_from": str(folder)}
