"""Atomic Hugging Face model folders: written to a temp path, renamed at the end.

A reader (transformers, a dashboard, a resumed run) never sees a half-written model:
the folder appears complete or not at all, and an interrupted write leaves nothing
behind but a hidden temp folder that is removed on the way out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from evomerge._paths import check_folder_target
from evomerge.errors import MergeError


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty folder unless asked; fail before any work."""
    check_folder_target(out, "output")
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise MergeError(f"output folder {out} is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old: Optional[Path] = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_card(recipe_yaml: str, *, base_model: Optional[str], models: list[str], title: str = "Merged model") -> str:
    """A README model card: front matter for the Hub, the sources and the recipe."""
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- evomerge", "- mergekit"]
    if base_model:
        lines += ["base_model:"] + [f"- {m}" for m in [base_model] + [m for m in models if m != base_model]]
    lines += ["---", "", f"# {title}", ""]
    lines += [
        "This model was merged with evomerge from the mergekit-compatible recipe below; "
        "`evomerge merge merge_recipe.yaml --out DIR` (or `mergekit-yaml`) rebuilds it.",
        "",
        "## Sources",
        "",
    ]
    for m in models:
        lines.append(f"- {m}" + (" (base)" if m == base_model else ""))
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


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
