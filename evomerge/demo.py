"""``evomerge demo``: the first thing a new user runs (``make demo``).

In one command and a few minutes on a laptop, offline:

1. builds (or reuses) the zoo: a tiny base model and one specialist per skill;
2. runs a multi-objective search (NSGA-II, one objective per skill) over TIES merges of
   two specialists with per-layer weights, on Ray workers, scored on the validation split;
3. scores the usual recipes on the held-out test split (specialists, base, uniform average,
   task arithmetic with the best lambda of a grid, TIES and DARE-TIES) and prints them next
   to the searched front members, with the margins;
4. leaves ``runs/demo/`` as any search does (study, Pareto models, plots) plus
   ``quality.json`` (the table) and ``status.txt``, and prints the commands to go further.

A second call continues the same run up to ``trials`` (a resume) and prints the table
again; ``fresh=True`` starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from evomerge.bench.quality import (
    DEFAULT_SKILLS,
    baseline_rows,
    check_skills,
    format_table,
    quality_table,
    search_config,
    searched_rows,
    write_config,
)
from evomerge.errors import ConfigError, SearchStopped
from evomerge.io import write_text_atomic

RUN_NAME = "demo"


def demo(
    *,
    runs_dir: Path = Path("runs"),
    zoo_dir: Path = Path("zoo"),
    skills: Sequence[str] = DEFAULT_SKILLS,
    trials: int = 100,
    workers: int = 2,
    executor: Optional[str] = None,
    optimizer: str = "nsga2",
    seed: int = 0,
    fresh: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns the quality table (as ``bench quality`` does) plus the run's paths."""
    from evomerge.run.api import create, open_search
    from evomerge.run.handle import CONFIG_NAME
    from evomerge.zoo import zoo

    if trials < 1 or workers < 1:
        raise ConfigError(f"demo: --trials and --workers must be at least 1 (got {trials} and {workers})")
    check_skills(None, skills)  # before a zoo is built for nothing
    say = (lambda *a: None) if quiet else print
    t0 = time.monotonic()
    say(f"[1/4] zoo: a tiny base model and one specialist per skill, in {zoo_dir} (built once, offline)")
    z = zoo(zoo_dir, progress=not quiet)
    check_skills(z, skills)
    say(f"      {'reused' if z.reused else 'built in %.0f s' % z.build_seconds}: specialists {', '.join(z.skills)}")

    run_dir = Path(runs_dir) / RUN_NAME
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if (run_dir / CONFIG_NAME).is_file():
        say(f"[2/4] search: continuing {run_dir} up to {trials} trials (--fresh starts over)")
        run = open_search(run_dir)
        _check_same_zoo(run, z)
    else:
        say(f"[2/4] search: {optimizer} over {len(skills)} objectives ({', '.join(f'{s}/accuracy' for s in skills)}), "
            f"{trials} trials, {workers} {executor or 'ray'} worker{'s' if workers > 1 else ''}, scored on validation")  # fmt: skip
        data = search_config(z, skills, optimizer=optimizer, trials=trials, workers=workers, executor=executor or "ray", seed=seed)
        path = write_config(data, Path(runs_dir), RUN_NAME)
        try:
            run = create(path, runs_dir=Path(runs_dir), name=RUN_NAME)
        finally:
            path.unlink()
    if executor is not None:  # a continued run keeps its executor unless told
        run.use_executor(kind=executor)
    summary = run.run(trials=trials, workers=workers, progress=not quiet)
    say(f"      {summary['n_complete']} complete, {summary['n_failed']} failed; front of {len(summary['pareto'])} models in {run_dir / 'pareto'}")
    if summary.get("stopped"):
        from evomerge.status import format_errors

        first = format_errors(summary["errors"], most=1)[0]
        raise SearchStopped(f"the search stopped early, {summary['stopped']} ({first}); evomerge demo again resumes it")

    say("[3/4] baselines: the usual recipes, scored on the held-out test split")
    rows = _baselines(run_dir, z, skills, quiet)
    rows.extend(searched_rows(run_dir, skills, "searched"))
    result = quality_table(rows, skills)
    result.update(run_dir=str(run_dir), zoo=str(z.root), trials=trials, n_complete=summary["n_complete"], optimizer=run.config.optimizer.name)
    write_text_atomic(run_dir / "quality.json", json.dumps(result, indent=2))
    table = format_table(result)
    write_text_atomic(run_dir / "quality.txt", table + "\n")
    say("")
    say(table)
    say(_verdict(result))

    say("[4/4] the run folder")
    from evomerge.status import format_status, status

    write_text_atomic(run_dir / "status.txt", format_status(status(run_dir)) + "\n")
    best = next((r for r in rows if r["name"] == "searched: best mean"), None)
    if best is not None and best.get("path"):
        result["loaded"] = _load(Path(best["path"]))
        say(f"      {best['path']} loads with transformers: {result['loaded']}")
    for name in ("pareto.json", "quality.txt", "status.txt", "pareto_front.png", "hypervolume.png", "coefficients.png"):
        if (run_dir / name).exists():
            say(f"      {run_dir / name}")
    say(f"done in {time.monotonic() - t0:.0f} s. Next:")
    trial = best["trial"] if best else "N"
    for cmd, why in [
        (f"evomerge status {run_dir}", "counts, best values, the front, throughput"),
        (f"evomerge dashboard {run_dir}", "optuna-dashboard on the study (http://127.0.0.1:8080)"),
        (f"evomerge export {run_dir} --trial {trial} --out my-merge", "a front member as a Hugging Face folder"),
        (f"evomerge resume {run_dir} --trials {trials + 50}", "search 50 trials more, where it stopped"),
        (f"cat {run_dir / 'config.yaml'}", "the run config, to adapt to your own models"),
    ]:
        say(f"  {cmd:<58} # {why}")
    return result


def _baselines(run_dir: Path, z: Any, skills: Sequence[str], quiet: bool) -> list[dict[str, Any]]:
    """The baseline rows, computed once per zoo and skills and kept in the run folder."""
    cache = run_dir / "baselines.json"
    key = {"zoo": z.fingerprint, "skills": list(skills)}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["rows"]
    rows = baseline_rows(z, skills, progress=not quiet)
    write_text_atomic(cache, json.dumps({"key": key, "rows": rows}, indent=2))
    return rows


def _check_same_zoo(run: Any, z: Any) -> None:
    base = Path(run.config.sources.base_model or "")
    if base.resolve() != Path(z.base).resolve():
        raise ConfigError(f"{run.run_dir} was searched on models in {base.parent}, not on the zoo in {z.root}; rerun with --fresh")


def _verdict(result: dict[str, Any]) -> str:
    if "best_searched" not in result:
        return "no searched member has held-out scores yet"
    m = result["margins"]
    parts = [f"{r['name']} {m[r['name']]:+.3f}" for r in result["rows"] if r["kind"] == "baseline"]
    word = "beats" if result.get("beats_baselines") else "does NOT beat every one of"
    return f"the best searched mean {word} the baselines; margins on test: " + ", ".join(parts)


def _load(folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    return f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters"

