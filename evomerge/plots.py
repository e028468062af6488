"""Report plots of a run, saved as PNG in the run folder and attached to the study.

- ``pareto_front.png``: every completed trial on the first two objectives, the front highlighted;
- ``hypervolume.png``: hypervolume of the front after each completed trial;
- ``coefficients.png``: the searched coefficients of the best front member, by layer.

The PNGs are also uploaded as study artifacts, so ``evomerge dashboard`` shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.io import save_figure
from evomerge import record
from evomerge.pareto import best_mean

ARTIFACTS = "artifacts"


def save_plots(run: Any, study: Any, front: Sequence[Any], *, space: Any = None) -> list[Path]:
    """The three PNGs of a run (a :class:`~evomerge.run.handle.Run`); ``space`` defaults to the run's."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    objectives = run.objectives
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and record.objective_values(t, objectives) is not None]
    if not done:
        return []
    names = [o.metric for o in objectives]
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    vals = np.array([record.objective_values(t, objectives) for t in done], dtype=float)
    fvals = np.array([record.objective_values(t, objectives) for t in front], dtype=float).reshape(-1, len(names))
    if len(names) >= 2:
        ax.scatter(vals[:, 0], vals[:, 1], s=14, c="#9aa5b1", label="trials")
        order = np.argsort(fvals[:, 0])
        ax.plot(fvals[order, 0], fvals[order, 1], "o-", c="#d1495b", label="Pareto front")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    else:
        ax.plot([t.number for t in done], vals[:, 0], ".", c="#9aa5b1", label="trials")
        ax.plot([t.number for t in front], fvals[:, 0], "o", c="#d1495b", label="best")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[0])
    ax.legend()
    ax.set_title(f"{run.name}: Pareto front")
    paths.append(save_figure(fig, run.run_dir / "pareto_front.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    hv = [(t.number, record.get(t, "hypervolume", 0.0)) for t in done]
    ax.step([n for n, _ in hv], np.maximum.accumulate([h for _, h in hv]), where="post", c="#2e86ab")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"{run.name}: hypervolume over trials")
    paths.append(save_figure(fig, run.run_dir / "hypervolume.png"))

    best = best_mean(front, objectives)
    rows, matrix = coefficient_matrix(space or run.space(), best.params) if best is not None else ([], None)
    if matrix is not None and len(rows):
        fig, ax = plt.subplots(figsize=(max(5, 0.45 * matrix.shape[1] + 3), 0.35 * len(rows) + 1.8))
        im = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xticks(range(matrix.shape[1]), [f"L{i}" for i in range(matrix.shape[1])], fontsize=7)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{run.name}: coefficients of trial {best.number}")
        paths.append(save_figure(fig, run.run_dir / "coefficients.png"))
    return paths


def coefficient_matrix(space: Any, params: dict[str, float]) -> tuple[list[str], Any]:
    """Rows (parameter/model/split) by layers, from a trial's params."""
    rows: dict[str, np.ndarray] = {}
    for d in space.dimensions:
        if not d.group.layers:
            continue
        label = "/".join(x for x in (d.param, space.labels.get(d.model) if d.model else None, d.split) if x)
        row = rows.setdefault(label, np.full(space.num_layers, np.nan))
        row[list(d.group.layers)] = params[d.name]
    if not rows:
        return [], None
    return list(rows), np.vstack(list(rows.values()))


def attach_to_study(run_dir: Path, study: Any, paths: Sequence[Path]) -> None:
    """Upload the PNGs as study artifacts (replacing earlier uploads of the same name)."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir = Path(run_dir) / ARTIFACTS
    store_dir.mkdir(exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    uploaded = dict(study.user_attrs.get("plot_artifacts", {}))
    for p in paths:
        old = uploaded.get(p.name)
        if old:
            try:
                store.remove(old)
            except Exception:  # noqa: BLE001 - an already missing file is fine
                pass
        uploaded[p.name] = upload_artifact(artifact_store=store, file_path=str(p), study_or_trial=study, mimetype="image/png")
    study.set_user_attr("plot_artifacts", uploaded)
