"""``evomerge bench dataflow``: data-flow search on the zoo, in figures (issue 21).

Three parts, from one invocation:

- **pruning** (``--prune-skill``, default ``add``): a data-flow search over the base and
  that skill's specialist (``dataflow_prune``: keep or skip each layer, one model for the
  whole path) with the skill's accuracy and ``size/layers`` as objectives, seeded with
  both models at full depth (the base is the uniform point, the specialist a seed
  recipe) and with each of their layers dropped once. Among all complete
  trials, the best full-depth one and the best one of at most 75% of the base's depth
  are picked on validation, exported (``evomerge export``) and scored on **test**; the
  ratio of their test accuracies is the figure. The front (validation accuracy against
  depth) is plotted.
- **joint vs parameter-only** (``--skills``, default ``reverse,count``): one search in
  the parameter space ``task_arithmetic_global`` and one in ``dataflow_joint`` (the same
  merge as one more source, plus a source per block of two layers, no layer skipped),
  same optimizer (``--joint-optimizer``, default ``--optimizer``), seed and number of
  evaluations, one objective per skill (or, for ``cma``/``cmaes``, their mean); both start
  from the same point (the uniform merge at full depth, recorded as
  ``start_validation_mean``); each one's front member best on the validation mean is
  reported with its test mean.
- **routing cost**: a candidate's "merge" step (routing) timed on the zoo and on a
  synthetic family ``--params`` large, with the bytes of weight the routed model holds
  that the sources do not (0: nothing copied).

Example (the figures of the README: 16 minutes on a shared, loaded 2-core machine)::

    evomerge bench dataflow --trials 60 --joint-optimizer cma --limit 200 --params 2e7 --json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from evomerge.bench.quality import OPTIMIZER_OPTIONS, check_skills, searched_rows, write_config

DEPTH_SHARE = 0.75  # acceptance 2: members of at most this share of the base's depth
KEEP_SHARE = 0.9  # ... that keep at least this share of the best full-depth member's accuracy
SINGLE_OBJECTIVE = ("cma", "cmaes")  # optimizers that see the skills' mean accuracy (no size objective: joint part only)


def _config(zoo: Any, models: Sequence[str], skills: Sequence[str], space: Any, *, trials: int, seed: int, optimizer: str,
            size: bool, limit: Optional[int], seeds: Sequence[Path] = ()) -> dict[str, Any]:
    evaluators = [{"preset": f"zoo_{s}", "name": s, "split": "validation", "holdout_split": "test", "limit": limit} for s in skills]
    objectives = [{"metric": f"{s}/accuracy", "direction": "maximize"} for s in skills]
    if size:
        evaluators.append({"preset": "size"})
        objectives.append({"metric": "size/layers", "direction": "minimize"})
    data = {
        "sources": {"base_model": str(zoo.base), "models": [str(zoo.models[m]) for m in models]},
        "search_space": space,
        "evaluators": evaluators,
        "objectives": objectives,
        "optimizer": {"name": optimizer, "options": dict(OPTIMIZER_OPTIONS.get(optimizer, {}))},
        "budget": {"trials": trials, "holdout_share": 1.0},  # the held-out table reads every member chosen on validation
        "seed": seed,
        "keep_pareto_models": True,
        "seed_recipes": [str(p) for p in seeds],
    }
    if optimizer in SINGLE_OBJECTIVE:  # the mean accuracy over the skills, as bench quality does
        data["scalarization"] = {"kind": "weighted_sum", "weights": [1.0 / len(skills)] * len(skills)}
    return data


def _pruning_seeds(refs: Sequence[Path], depth: int, folder: Path, *, full: bool = True) -> list[Path]:
    """``slices:`` recipes as seed points: each source at full depth (with ``full``) and
    with each of its layers dropped once (the first step of depth pruning, ``depth``
    points per source)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ref in refs:
        for drop in ([None] if full else []) + list(range(depth)):
            ranges = [[0, depth]] if drop is None else [r for r in ([0, drop], [drop + 1, depth]) if r[0] < r[1]]
            path = folder / f"{Path(ref).name}-{'full' if drop is None else f'without-{drop}'}.yaml"
            path.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32",
                                            "slices": [{"sources": [{"model": str(ref), "layer_range": r}]} for r in ranges]}))
            out.append(path)
    return out


def _search(data: dict[str, Any], runs_dir: Path, name: str, progress: bool) -> Any:
    from evomerge.run.api import create

    path = write_config(data, runs_dir, name)
    try:
        run = create(path, runs_dir=runs_dir, name=name)
    finally:
        path.unlink()
    summary = run.run(progress=progress)
    return run, summary


def prune_part(zoo: Any, skill: str, *, trials: int, seed: int, optimizer: str, runs_dir: Path, plot: Optional[Path],
               limit: Optional[int], progress: bool) -> dict[str, Any]:
    """Acceptance 2: the best member of at most 75% depth against the best full-depth one, on test."""
    from optuna.trial import TrialState

    from evomerge import record
    from evomerge.evaluate import build_evaluator, evaluate
    from evomerge.export import export

    t0 = time.perf_counter()
    name = f"dataflow-prune-{time.strftime('%H%M%S')}"
    depth = _depth(zoo)
    # the base at full depth is the uniform point; the specialist at full depth is a seed,
    # and so is each model with one layer dropped
    folder = runs_dir / f"{name}-seeds"
    seeds = _pruning_seeds([zoo.models[skill]], depth, folder) + _pruning_seeds([zoo.base], depth, folder, full=False)
    run, summary = _search(_config(zoo, [skill], [skill], "dataflow_prune", trials=trials, seed=seed, optimizer=optimizer,
                                   size=True, limit=limit, seeds=seeds), runs_dir, name, progress)
    metric = f"{skill}/accuracy"
    trials_done = [t for t in run.load_study().get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    scored = [(t.number, record.get(t, "scores")) for t in trials_done]
    full = [(n, s) for n, s in scored if s["size/layers"] >= depth]
    short = [(n, s) for n, s in scored if s["size/layers"] <= DEPTH_SHARE * depth]
    test_ev = build_evaluator(f"zoo_{skill}", split="test")

    def on_test(pick: Optional[tuple[int, dict]]) -> Optional[dict[str, Any]]:
        if pick is None:
            return None
        out = run.run_dir / "exported" / str(pick[0])
        if not out.is_dir():
            export(run.run_dir, pick[0], out)
        test = evaluate(out, [test_ev], limit=limit)[f"{test_ev.name}/accuracy"]
        return {"trial": pick[0], "layers": int(pick[1]["size/layers"]), "validation": round(pick[1][metric], 4), "test": round(test, 4)}

    best = lambda rows: max(rows, key=lambda r: (r[1][metric], -r[1]["size/layers"], -r[0]), default=None)  # noqa: E731
    best_full, best_short = on_test(best(full)), on_test(best(short))
    ratio = round(best_short["test"] / best_full["test"], 4) if best_full and best_short and best_full["test"] > 0 else None
    front = [(m["values"][metric], m["values"]["size/layers"]) for m in _members(run.run_dir)]
    if plot is not None:
        _plot(front, scored, metric, depth, plot)
    return {
        "skill": skill, "base_depth": depth, "trials": summary["n_complete"], "best_full_depth": best_full,
        "best_at_most_75pct_depth": best_short, "test_ratio": ratio,
        "meets": ratio is not None and ratio >= KEEP_SHARE,
        "front": sorted({(round(a, 4), int(d)) for a, d in front}, key=lambda x: x[1]),
        "route_seconds": _route_seconds(trials_done), "seconds": round(time.perf_counter() - t0, 1),
    }


def _depth(zoo: Any) -> int:
    """The zoo base's layer count (from its config, no weight read)."""
    import json

    return int(json.loads((Path(zoo.base) / "config.json").read_text())["num_hidden_layers"])


def _members(run_dir: Path) -> list[dict]:
    import json

    return json.loads((run_dir / "pareto.json").read_text())["members"]


def _route_seconds(trials: Sequence[Any]) -> dict[str, float]:
    from evomerge import record

    values = [record.get(t, "merge_seconds") for t in trials if record.get(t, "merge_seconds") is not None]
    return {"median": round(statistics.median(values), 6), "max": round(max(values), 6)} if values else {}


def _plot(front: list[tuple[float, float]], scored: list[tuple[int, dict]], metric: str, depth: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.io import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([s["size/layers"] for _, s in scored], [s[metric] for _, s in scored], s=12, alpha=0.4, label="trials")
    pts = sorted(front, key=lambda p: p[1])
    ax.step([d for _, d in pts], [a for a, _ in pts], where="post", color="C3", marker="o", label="Pareto front")
    ax.axvline(DEPTH_SHARE * depth, ls=":", color="gray")
    full = [s[metric] for _, s in scored if s["size/layers"] >= depth]
    if full:  # what a member of at most 75% depth must keep (here on validation)
        ax.axhline(KEEP_SHARE * max(full), ls=":", color="C2", label=f"{KEEP_SHARE:.0%} of the best full depth")
    ax.set_xlabel("layers")
    ax.set_ylabel(f"{metric} (validation)")
    ax.legend(fontsize=8)
    ax.set_title("data-flow search: accuracy against depth")
    save_figure(fig, path)


def joint_part(zoo: Any, skills: Sequence[str], *, trials: int, seed: int, optimizer: str, runs_dir: Path,
               limit: Optional[int], progress: bool) -> dict[str, Any]:
    """Acceptance 3: joint parameter + data-flow against parameter-only, same evaluations."""
    from evomerge.dataflow import build_space

    inner = build_space("dataflow_joint", base_model="b", models=["m"], num_layers=1).config.merge
    out: dict[str, Any] = {"skills": list(skills), "trials": trials, "parameter_space": inner}
    for label, space in (("parameter", inner), ("joint", "dataflow_joint")):
        name = f"dataflow-{label}-{time.strftime('%H%M%S')}"
        t0 = time.perf_counter()
        data = _config(zoo, skills, skills, space, trials=trials, seed=seed, optimizer=optimizer, size=False, limit=limit)
        if optimizer == "cma":  # the ES starts at the uniform point too (not the cube's centre)
            data["optimizer"]["options"]["x0"] = build_space(space, base_model=str(zoo.base), models=data["sources"]["models"],
                                                             num_layers=_depth(zoo)).uniform_params()
        run, summary = _search(data, runs_dir, name, progress)
        rows = searched_rows(run.run_dir, skills, label)
        best = rows[0] if rows else None
        out[label] = {"n_complete": summary["n_complete"], "validation_mean": best and best["validation_mean"],
                      "test_mean": best and best["mean"], "trial": best and best["trial"], "test": best and best["test"],
                      "start_validation_mean": _start(run, skills), "seconds": round(time.perf_counter() - t0, 1)}
        if label == "joint":
            out[label]["best_validation_mean_by_path"] = by_path(run.load_study(), skills)
    p, j = out["parameter"]["test_mean"], out["joint"]["test_mean"]
    out["joint_minus_parameter"] = round(j - p, 4) if p is not None and j is not None else None
    return out


def by_path(study: Any, skills: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per data-flow choice of a joint study (its ``source/`` parameters, e.g. ``B0=0,B1=2``),
    the number of trials and their best validation mean: whether any path besides the
    parameter merge's own helps."""
    from evomerge import record

    out: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        scores = record.get(t, "scores")
        if not scores:
            continue
        key = ",".join(f"{k.rsplit('/', 1)[1]}={v}" for k, v in sorted(t.params.items()) if k.startswith("source/")) or "-"
        mean = statistics.mean(scores[f"{s}/accuracy"] for s in skills)
        row = out.setdefault(key, {"trials": 0, "best": mean})
        row["trials"] += 1
        row["best"] = round(max(row["best"], mean), 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["best"]))


def _start(run: Any, skills: Sequence[str]) -> Optional[float]:
    """The validation mean of the run's first trial (its uniform point: the same merge at
    full depth in both searches, so the joint search starts where the parameter one does)."""
    from evomerge import record

    trials = [t for t in run.load_study().get_trials(deepcopy=False) if t.number == 0 and record.get(t, "scores")]
    return round(statistics.mean(record.get(trials[0], "scores")[f"{s}/accuracy"] for s in skills), 4) if trials else None


def routing_part(zoo: Any, *, n_params: float, repeats: int, workdir: Optional[Path]) -> dict[str, Any]:
    """Acceptance 5: routing a 1.5x-deep path costs microseconds whatever the model size, and
    the routed model holds no weight of its own."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge._testing import config_for_params, write_family
    from evomerge.merge.routed import Router, shared_weights
    from evomerge.merge.slices import SliceRecipe

    def measure(folders: Sequence[Path]) -> dict[str, Any]:
        models = {str(f): AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in folders}
        router = Router(models)
        refs = list(models)
        depth = len(models[refs[0]].model.layers)
        slices = [{"sources": [{"model": refs[i % len(refs)], "layer_range": [a, min(depth, a + max(1, depth // 4))]}]}
                  for i, a in enumerate(list(range(0, depth, max(1, depth // 4))) + list(range(depth // 2, depth, max(1, depth // 4))))]
        recipe = SliceRecipe.from_dict({"merge_method": "passthrough", "slices": slices})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            live = router.route(recipe)
            times.append(time.perf_counter() - t0)
        own = {t.data_ptr() for m in models.values() for t in [*m.parameters(), *m.buffers()]}
        extra = sum(t.numel() * t.element_size() for t in [*live.parameters(), *live.buffers()] if t.data_ptr() not in own)
        params = sum(p.numel() for p in models[refs[0]].parameters())
        return {"source_params": params, "source_depth": depth, "routed_depth": recipe.depth,
                "route_ms_median": round(1e3 * statistics.median(times), 4), "route_ms_max": round(1e3 * max(times), 4),
                "weights_shared": shared_weights(live, models), "extra_weight_bytes": extra}

    out = {"zoo": measure([zoo.base, *zoo.models.values()][:3])}
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-dataflow-", dir=workdir) as tmp:
        folders = write_family(Path(tmp), 1, seed=3, cfg=config_for_params(n_params), tokenizer=False)
        out["synthetic"] = measure(folders)
    return out


def bench_dataflow(
    *,
    zoo_dir: Optional[Path] = None,
    prune_skill: str = "add",
    skills: Sequence[str] = ("reverse", "count"),
    trials: int = 60,
    optimizer: str = "nsga2",
    joint_optimizer: Optional[str] = None,
    seed: int = 0,
    runs_dir: Optional[Path] = None,
    plot: Optional[Path] = None,
    limit: Optional[int] = None,
    n_params: float = 5e7,
    repeats: int = 50,
    parts: Sequence[str] = ("prune", "joint", "routing"),
    progress: bool = True,
) -> dict[str, Any]:
    """The three parts (see the module docstring) as one dict."""
    from evomerge.zoo import default_zoo_dir, load_zoo, zoo

    for z in (None, "zoo"):
        if z == "zoo":
            zoo_dir = zoo_dir or default_zoo_dir()
            z = load_zoo(zoo_dir, quiet=True) or zoo(zoo_dir, progress=progress)
        check_skills(z, skills)
        check_skills(z, [prune_skill], flag="--prune-skill", at_least=1)
    tmp = None
    if runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="evomerge-bench-dataflow-")
        runs_dir = Path(tmp.name)
    joint_optimizer = joint_optimizer or optimizer
    if "prune" in parts and optimizer in SINGLE_OBJECTIVE:
        from evomerge.errors import ConfigError

        raise ConfigError(f"--optimizer {optimizer}: the pruning search has two objectives (accuracy, size/layers); "
                          "pick a multi-objective one (nsga2, tpe, random) or set --joint-optimizer only")
    result: dict[str, Any] = {"zoo": str(z.root), "trials": trials, "optimizer": optimizer, "joint_optimizer": joint_optimizer,
                              "seed": seed, "limit": limit}
    try:
        if "routing" in parts:
            result["routing"] = routing_part(z, n_params=n_params, repeats=repeats, workdir=None)
        if "prune" in parts:
            result["prune"] = prune_part(z, prune_skill, trials=trials, seed=seed, optimizer=optimizer, runs_dir=Path(runs_dir),
                                         plot=plot, limit=limit, progress=progress)
        if "joint" in parts:
            result["joint"] = joint_part(z, skills, trials=trials, seed=seed, optimizer=joint_optimizer, runs_dir=Path(runs_dir),
                                         limit=limit, progress=progress)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = []
    r = result.get("routing")
    if r:
        lines.append("routing (a candidate's merge step):")
        for k, v in r.items():
            lines.append(f"  {k:9s} {v['source_params']:>12,d} params, {v['source_depth']} -> {v['routed_depth']} layers: "
                         f"{v['route_ms_median']:.3f} ms median ({v['route_ms_max']:.3f} max), weights shared {v['weights_shared']}, "
                         f"extra weight bytes {v['extra_weight_bytes']}")
    p = result.get("prune")
    if p:
        lines.append(f"pruning ({p['skill']}, base depth {p['base_depth']}, {p['trials']} trials):")
        for key in ("best_full_depth", "best_at_most_75pct_depth"):
            m = p[key]
            lines.append(f"  {key:26s} " + ("none" if m is None else f"trial {m['trial']}, {m['layers']} layers, validation {m['validation']:.3f}, test {m['test']:.3f}"))
        lines.append(f"  test ratio {p['test_ratio']} (needs >= {KEEP_SHARE}): {'met' if p['meets'] else 'not met'}; front {p['front']}")
        lines.append(f"  routing in the search: {p['route_seconds']}")
    j = result.get("joint")
    if j:
        lines.append(f"joint vs parameter-only ({', '.join(j['skills'])}, {j['trials']} evaluations each, {result.get('joint_optimizer')}, "
                     "held-out mean of the best validation-mean member):")
        for key in ("parameter", "joint"):
            lines.append(f"  {key:9s} test mean {j[key]['test_mean']}, validation mean {j[key]['validation_mean']} (trial {j[key]['trial']}), "
                         f"first trial's validation mean {j[key].get('start_validation_mean')}")
        lines.append(f"  joint - parameter: {j['joint_minus_parameter']}")
    return "\n".join(lines)
