"""The ``evomerge`` command line: argument parsing and printing only.

Every verb is a few lines over a public library function of the same name. Errors a
user can cause are :class:`~evomerge.errors.EvomergeError`: printed as one line on
stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from evomerge import __version__
from evomerge._paths import check_folder_target
from evomerge.errors import ConfigError, EvomergeError, SearchStopped

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- merge
def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models as a mergekit-compatible recipe says",
        description="Merge the models a mergekit-compatible recipe names and write a "
        "Hugging Face model folder (safetensors, config, tokenizer, recipe, model card).",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit format)")
    p.add_argument("--out", type=Path, required=True, help="output folder; must not exist or be empty")
    p.add_argument("--device", default="cpu", help="device to merge on: cpu or cuda (default: cpu)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow reading pickle checkpoints (.bin/.pt); they can run code, so off by default",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--adapter", action="store_true", help="write one PEFT LoRA adapter instead of a model (exact for linear merges of adapters)")
    p.add_argument("--rank", type=int, help="with --adapter: truncate every merged update to this rank by SVD (any merge); the error is printed")
    p.add_argument("--device-memory", help="memory the merge may use on the device, live model included, such as 60GB (default: 75%% of a GPU)")
    p.add_argument("--host-memory", help="memory the merge may use on the host when merging on the CPU, such as 16GB (default: no limit)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(handler=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from evomerge.merge import merge
    from evomerge.merge.budget import MemoryBudget

    if args.rank is not None and args.rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {args.rank}")
    budget = MemoryBudget.parse(args.device_memory, args.host_memory, labels=("--device-memory", "--host-memory"))
    summary = merge(
        args.recipe,
        args.out,
        device=args.device,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        progress=not args.json,
        adapter=args.adapter,
        rank=args.rank,
        budget=budget,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    elif "rank" in summary:
        how = "exact" if summary["exact"] else f"truncated by SVD, relative error {summary['error']:.3g} (worst tensor {max(summary['errors'].values()):.3g})"
        print(f"wrote a rank-{summary['rank']} LoRA adapter of {summary['n_modules']} modules ({how}) in {summary['seconds']:.2f} s -> {summary['out']}")
    else:
        print(
            f"merged {summary['n_tensors']} tensors with {summary['merge_method']} "
            f"in {summary['seconds']:.2f} s -> {summary['out']}"
        )
    return 0


# --------------------------------------------------------------------------- search
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search merge coefficients as a run config says",
        description="Create runs/<name>/ from a run config (sources, search space, evaluators, "
        "objectives, optimizer, budget) and run the search. Every trial lands in an Optuna study; "
        "the Pareto front is kept as model folders in runs/<name>/pareto/.",
    )
    p.add_argument("config", type=Path, help="run config YAML")
    p.add_argument("--name", help="run name (default: the config's name, else the file name)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="folder holding run folders (default: runs)")
    p.add_argument("--trials", type=int, help="budget: completed (or pruned) trials; overrides the config")
    p.add_argument("--timeout", type=float, help="budget: wall-clock seconds; overrides the config")
    p.add_argument("--workers", type=int, help="parallel workers (slots); overrides the config")
    _add_executor_options(p, "the config's, else serial")
    p.add_argument("--storage", help="Optuna storage URL (default: a journal file in the run folder)")
    p.add_argument("--seed", type=int, help="seed for the optimizer and random merge methods; overrides the config")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=_run_search)


def _add_executor_options(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--executor", choices=["serial", "ray"], help=f"where candidates run (default: {default})")
    p.add_argument("--cpus-per-worker", type=float, help="Ray: CPUs per worker, fractions allowed; torch threads = floor (default: CPUs / workers)")
    p.add_argument("--gpus-per-worker", type=float, help="Ray: GPUs per worker, fractions allowed (workers then share a GPU)")
    p.add_argument("--ray-address", help="Ray: join this cluster (HOST:PORT, auto, ray://...) instead of starting a local one")
    p.add_argument("--ray-dashboard", action="store_true", default=None, help="Ray: start the local cluster with its dashboard")


def _executor_overrides(args: argparse.Namespace) -> dict:
    """executor.* fields the options set; a Ray option without --executor means Ray."""
    out = {"kind": args.executor} if args.executor is not None else {}
    for option in ("cpus_per_worker", "gpus_per_worker", "ray_address", "ray_dashboard"):
        if getattr(args, option) is not None:
            out[option] = getattr(args, option)
            out.setdefault("kind", "ray")
    return out


def _run_search(args: argparse.Namespace) -> int:
    from evomerge.run_config import check_run_name
    from evomerge.study import SearchRun

    if args.name is not None:
        try:
            check_run_name(args.name)
        except ValueError as exc:
            raise ConfigError(f"--name {exc}") from None
    overrides = {f"executor.{k}": v for k, v in _executor_overrides(args).items()}
    if args.trials is not None:
        overrides["budget.trials"] = args.trials
    if args.timeout is not None:
        overrides["budget.timeout"] = args.timeout
    if args.workers is not None:
        overrides["executor.workers"] = args.workers
    if args.seed is not None:
        overrides["seed"] = args.seed
    run = SearchRun.create(args.config, runs_dir=args.runs_dir, name=args.name, storage=args.storage, overrides=overrides)
    return _search_and_report(run, args)


def _search_and_report(run, args: argparse.Namespace, **budget) -> int:
    from evomerge.status import format_errors

    try:
        summary = run.run(progress=not args.json, **budget)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are saved; continue with: evomerge resume {run.run_dir}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['n_complete']} complete, {summary['n_failed']} failed, {summary['n_pruned']} pruned; "
            f"front of {len(summary['pareto'])} in {run.run_dir / 'pareto'}"
        )
        names = [o["name"] for o in summary["objectives"]]
        for m in summary["pareto"]:
            vals = "  ".join(f"{n}={v:.4g}" for n, v in zip(names, m["values"]))
            held = ""
            if m.get("holdout_values"):
                held = "  held-out: " + "  ".join(f"{n}={v:.4g}" for n, v in zip(names, m["holdout_values"]) if v is not None)
            print(f"  trial {m['trial']:4d}  {vals}{held}")
        more = summary["n_complete"] + summary["n_pruned"] + 50  # --trials is a total
        print(f"next: evomerge status {run.run_dir} | evomerge dashboard {run.run_dir} | "
              f"evomerge export {run.run_dir} --trial N --out DIR | evomerge resume {run.run_dir} --trials {more}")
    for line in format_errors(summary.get("errors", [])):
        print(line, file=sys.stderr)
    if summary.get("stopped"):
        # The budget is not spent: say so in the exit code, so that scripts do not take it for a finished run.
        raise SearchStopped(f"stopped early, {summary['stopped']}; fix the cause above, then: evomerge resume {run.run_dir}")
    return 0


# --------------------------------------------------------------------------- resume
def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "resume",
        help="continue a run after a crash, Ctrl-C or a finished budget",
        description="Continue runs/<name>/ from its frozen config.yaml: trials a crash left RUNNING "
        "are marked FAIL and asked again, the optimizer's state is restored, the Pareto folder is "
        "reconciled with the study, and the search runs until its total budget.",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (runs/<name>)")
    p.add_argument("--trials", type=int, help="total budget of completed (or pruned) trials; raise it to search longer")
    p.add_argument("--timeout", type=float, help="wall-clock seconds for this session")
    p.add_argument("--workers", type=int, help="parallel workers (slots) for this session")
    _add_executor_options(p, "the run's; these options hold for this session only")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=_run_resume)


def _run_resume(args: argparse.Namespace) -> int:
    from evomerge.study import SearchRun

    run = SearchRun.open(args.run_dir, storage=args.storage)
    run.use_executor(**_executor_overrides(args))  # this session only
    budget, done = args.trials if args.trials is not None else run.config.budget.trials, run.trials_done()
    if budget is not None and done >= budget:  # --trials is a total, not a number of trials more
        print(f"{run.run_dir}: {done} trials done, budget {budget}: nothing to run; "
              f"--trials is the total, e.g. --trials {done + 50} for 50 more", file=sys.stderr)
    return _search_and_report(run, args, trials=args.trials, timeout=args.timeout, workers=args.workers)


# --------------------------------------------------------------------------- status
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="counts, best values, Pareto front and throughput of a run",
        description="Read a run's study (safe while the search is writing) and print counts by state, "
        "best value per objective, the Pareto front (trial, values, held-out values, path), "
        "hypervolume, throughput and time spent merging vs evaluating.",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (runs/<name>)")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from evomerge.status import format_status, status

    s = status(args.run_dir, storage=args.storage)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


# --------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write one trial's merged model as a Hugging Face folder",
        description="Rebuild a trial's merged model from its stored recipe (same folder format as merge).",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (runs/<name>)")
    p.add_argument("--trial", type=_trial_ref, required=True, help="trial number (see evomerge status), or 'best': the front member with the best mean of the objectives")
    p.add_argument("--out", type=Path, required=True, help="output folder; must not exist or be empty")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.set_defaults(handler=_run_export)


def _trial_ref(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a trial number or 'best', got {text!r}") from None


def _run_export(args: argparse.Namespace) -> int:
    from evomerge.export import export

    summary = export(args.run_dir, args.trial, args.out, overwrite=args.overwrite, storage=args.storage)
    print(f"wrote trial {summary['trial']} ({summary['merge_method']}, {summary['n_tensors']} tensors) -> {summary['out']}")
    return 0


# --------------------------------------------------------------------------- dashboard
def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="open optuna-dashboard on a run",
        description="Serve optuna-dashboard on the run's storage (and its plots). Binds to "
        "127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (runs/<name>)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.set_defaults(handler=_run_dashboard)


def _run_dashboard(args: argparse.Namespace) -> int:
    from evomerge.dashboard import dashboard

    dashboard(args.run_dir, host=args.host, port=args.port, storage=args.storage)
    return 0


# --------------------------------------------------------------------------- zoo
def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zoo",
        help="build the offline demo family of small models (or reuse it)",
        description="Build, offline and deterministically, a family of tiny Llama models with a "
        "character tokenizer: a base, one specialist per skill (add, reverse, sort, count), a second "
        "base from another initialization, and the skills' train/validation/test JSONL. Prints each "
        "model's test accuracy per skill, with the specialists' uniform average. A second call reuses "
        "the folder, with the recipe it was built with unless --set or --default says otherwise.",
    )
    p.add_argument("dir", type=Path, help="folder to build the zoo in")
    p.add_argument("--rebuild", action="store_true", help="build again even if DIR holds this zoo")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one number of the recipe, such as hidden=128, intermediate=384, layers, heads, "
        "base_steps, base_lr, finetune_steps or base_alt_seed (repeatable; see evomerge.zoo.ZooRecipe); "
        "the folder remembers these changes",
    )
    p.add_argument("--default", action="store_true", help="the default recipe, even if DIR was built with --set")
    p.add_argument("--workers", type=int, default=None, help="training processes (default: 2, or 1 on one core)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(handler=_run_zoo)


def _run_zoo(args: argparse.Namespace) -> int:
    from evomerge.zoo import ZooRecipe, format_table, zoo

    if args.set and args.default:
        raise ConfigError("zoo: --set and --default exclude each other")
    recipe = ZooRecipe().with_overrides(args.set) if args.set or args.default else None  # None: the folder's own
    z = zoo(args.dir, recipe=recipe, rebuild=args.rebuild, progress=not args.json, workers=args.workers)
    if args.json:
        print(json.dumps({"dir": str(z.root), "reused": z.reused, "build_seconds": z.build_seconds, "changes": z.manifest.get("changes", {}),
                          "models": {k: str(v) for k, v in z.models.items()}, "table": z.table}, indent=2))
    else:
        how = "reused" if z.reused else f"built in {z.build_seconds:.1f} s"
        changes = z.manifest.get("changes", {})
        how += "; recipe: " + (", ".join(f"{k}={v}" for k, v in changes.items()) if changes else "default")
        print(f"zoo {z.root} ({how}); test exact match per skill:")
        print(format_table(z.table, z.skills))
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model folder with evaluators (lm-eval tasks, a dataset, a function)",
        description="Score a Hugging Face model folder with one or more evaluators (a preset name "
        "from evaluators/ or a YAML file). Every evaluator is checked before the model loads. "
        "Metrics are printed as <evaluator>/<metric>.",
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="model folder")
    p.add_argument("--evaluator", "-e", action="append", required=True, metavar="NAME_OR_YAML", help="evaluator preset or YAML file (repeatable)")
    p.add_argument("--split", default=None, help="split to score, such as validation or test (default: the evaluator's)")
    p.add_argument("--limit", default=None, help="a count, or a fraction in (0, 1], of the examples (a fixed subset)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from evomerge.evaluate import evaluate

    scores = evaluate(args.model_dir, args.evaluator, split=args.split, limit=_limit(args.limit), device=args.device)
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        width = max(len("metric"), *(len(k) for k in scores))
        print(f"{'metric'.ljust(width)}  value")
        print(f"{'-' * width}  ------")
        for k, v in scores.items():
            print(f"{k.ljust(width)}  {v:.4f}")
    return 0


# --------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark and print its table (or JSON)",
        description="Benchmarks print ratios measured in the same run.",
    )
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    m = bsub.add_parser(
        "merge",
        help="time merge_into per method against the memory-traffic floor",
        description="Time MergeEngine.merge_into for each merge method on a synthetic "
        "Llama model with 3 fine-tuned sources, float32 and bfloat16, next to the time to copy "
        "the bytes the merge must read and write (the floor): a new candidate per merge, the same "
        "recipe again, and a fresh process's first merge with the compile cache cold and warm.",
    )
    m.add_argument("--params", type=float, default=110e6, help="model size in parameters (default: 1.1e8)")
    m.add_argument("--sources", type=int, default=3, help="fine-tuned sources besides the base (default: 3)")
    m.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the median is kept (default: 3)")
    m.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    m.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the sources and the live model (default: float32,bfloat16)")
    m.add_argument("--no-first-merge", action="store_true", help="skip the fresh-process first merges (cold and warm compile cache)")
    m.add_argument("--adapters", type=int, metavar="RANK", help="instead: 3 LoRA adapters of this rank against the same adapters merged into full models (default methods: linear, task_arithmetic, ties)")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    m.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp folder)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(handler=_run_bench_merge)

    sc = bsub.add_parser(
        "scale",
        help="memory, disk and time per parameter of merging, and a prediction for a real model",
        description="Per method and number of fine-tunes, a fresh process merges candidates of a bfloat16 "
        "family into a bfloat16 live model and reports its private memory beyond the live model, device "
        "memory (CUDA), bytes written to disk, first and later merge time against the memory floor; a line "
        "through the sizes gives bytes per parameter. --config predicts a real model's merge on a GPU "
        "(examples/configs/ holds Llama-3.1-8B and -70B).",
    )
    sc.add_argument("--params", default="1e8,3e8", help="family sizes, comma-separated (default: 1e8,3e8)")
    sc.add_argument("--sources", default="2,4", help="fine-tunes besides the base, comma-separated (default: 2,4)")
    sc.add_argument("--methods", default=None, help="comma-separated methods (default: linear, task_arithmetic, ties, dare_ties, breadcrumbs, della, slerp, model_stock)")
    sc.add_argument("--config", action="append", default=[], type=Path, metavar="CONFIG_JSON", help="predict for this model config (repeatable)")
    sc.add_argument("--device", default="cpu", help="where to merge: cpu or cuda (default: cpu)")
    sc.add_argument("--device-memory", default="80GB", help="GPU size of the prediction (default: 80GB)")
    sc.add_argument("--threads", type=int, default=None, help="torch threads per probe (default: all cores)")
    sc.add_argument("--workdir", type=Path, default=None, help="where the families go (default: a temp folder)")
    sc.add_argument("--json", action="store_true", help="print JSON")
    sc.set_defaults(handler=_run_bench_scale)

    al = bsub.add_parser(
        "align",
        help="midpoint barrier of two unrelated models: unaligned, weight, activation, mudsc, ensemble",
        description="Compare the endpoints, their output ensemble and the midpoint (A + B) / 2 "
        "without alignment and after weight, activation and mudsc alignment (each alpha of the "
        "grid, and alpha chosen on validation), then that alignment after --refine steps of learned "
        "refinement. By default the zoo's two independently initialized bases, scored on the "
        "held-out test split. Checks whether mudsc, and refined mudsc, at least halve the unaligned "
        "midpoint barrier.",
    )
    al.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder, built if missing (default: zoo)")
    al.add_argument("--reference", help="model A instead of the zoo's (needs --model, --evaluator, --data)")
    al.add_argument("--model", help="model B instead of the zoo's")
    al.add_argument("--evaluator", help="evaluator preset or .jsonl/text file (with --reference/--model)")
    al.add_argument("--data", help="activation data: evaluator preset or .jsonl/text file (with --reference/--model)")
    al.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="mudsc alpha grid (default: 0,0.25,0.5,0.75,1)")
    al.add_argument("--steps", type=int, default=3, help="points on each path, endpoints included (default: 3)")
    al.add_argument("--refine", type=int, default=500, metavar="STEPS", help="steps of learned refinement of the chosen mudsc alignment, one more row (default: 500; 0: no such row)")
    al.add_argument("--limit", type=int, help="test examples per skill (zoo only; default: all)")
    al.add_argument("--search", action="store_true", help="also run the same search over two independently initialized specialists with and without alignment (zoo only)")
    al.add_argument("--skills", default="add,reverse", help="with --search: A's skill (from base) and B's (fine-tuned from base_alt) (default: add,reverse)")
    al.add_argument("--trials", type=int, default=60, help="with --search: trials per search (default: 60)")
    al.add_argument("--seeds", default="0,1,2", help="with --search: one search of each kind per seed (default: 0,1,2)")
    al.add_argument("--workdir", type=Path, default=Path("runs/bench_align"), help="with --search: where B and the runs go (default: runs/bench_align)")
    al.add_argument("--json", action="store_true", help="print JSON")
    al.set_defaults(handler=_run_bench_align)

    se = bsub.add_parser(
        "search",
        help="search throughput and worker memory: serial, ray x1, ray x2 on the zoo",
        description="Run the same search on the offline zoo with the serial executor and with Ray "
        "(1 and 2 workers by default): candidates per minute, the share of worker time spent outside "
        "merge + evaluate (steady state: after actor start-up and one warm-up job per worker), and "
        "resident memory per worker; then what an extra worker adds in memory on a larger synthetic model.",
    )
    se.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder, built if missing (default: zoo)")
    se.add_argument("--trials", type=int, default=24, help="trials per timed search (default: 24)")
    se.add_argument("--workers", default="1,2", help="Ray worker counts to time, comma-separated (default: 1,2)")
    se.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker (default: 1)")
    se.add_argument("--optimizer", default="random", help="sampler of the timed searches (default: random)")
    se.add_argument("--limit", type=int, default=None, help="examples per skill and candidate (default: all of the validation split)")
    se.add_argument("--memory-params", type=float, default=1e8, help="model size of the memory probe; 0 skips it (default: 1e8)")
    se.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temp folder)")
    se.add_argument("--json", action="store_true", help="print JSON")
    se.set_defaults(handler=_run_bench_search)

    qu = bsub.add_parser(
        "quality",
        help="searched merges vs specialists, uniform average, task arithmetic, TIES, DARE-TIES on held-out data",
        description="On the offline zoo, score on the test split: each specialist, the base, the uniform "
        "average, task arithmetic with the best lambda of a 0.1-step grid (chosen on validation), TIES and "
        "DARE-TIES with mergekit's defaults and with density 0.5; then run one search per optimizer (on "
        "validation) and add its front members best per skill and best on the mean, with the margins.",
    )
    qu.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder, built if missing (default: zoo)")
    qu.add_argument("--skills", default="reverse,count", help="zoo skills merged, comma-separated (default: reverse,count)")
    qu.add_argument("--optimizers", default="nsga2,cma", help="one search per optimizer, comma-separated (default: nsga2,cma)")
    qu.add_argument("--trials", type=int, default=100, help="trials per search (default: 100)")
    qu.add_argument("--executor", choices=["serial", "ray"], default="serial", help="where candidates run (default: serial)")
    qu.add_argument("--workers", type=int, default=1, help="parallel workers of each search (default: 1)")
    qu.add_argument("--seed", type=int, default=0, help="seed of every search (default: 0)")
    qu.add_argument("--runs-dir", type=Path, default=None, help="keep the searches' run folders here (default: a temp folder)")
    qu.add_argument("--limit", type=int, default=None, help="examples per skill and split, for a quick look (default: all 500)")
    qu.add_argument("--json", action="store_true", help="print JSON")
    qu.set_defaults(handler=_run_bench_quality)

    ev = bsub.add_parser(
        "evaluate",
        help="evaluator speed on a zoo model: lm_eval first vs later calls, dataset 500 examples",
        description="Time the lm_eval evaluator's first call (tasks loaded, requests built) against "
        "later calls on the same live model (target: under a third), and the dataset evaluator on "
        "500 examples of a zoo skill (target: under 1 s on two cores). Builds the zoo if needed.",
    )
    ev.add_argument("--zoo", type=Path, default=None, help="zoo folder, built if missing (default: $EVOMERGE_ZOO_CACHE or .cache/zoo)")
    ev.add_argument("--skill", default="add", help="zoo skill whose specialist is scored (default: add)")
    ev.add_argument("--repeats", type=int, default=5, help="later calls timed; the median is kept (default: 5)")
    ev.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(handler=_run_bench_evaluate)


def _run_bench_evaluate(args: argparse.Namespace) -> int:
    from evomerge.bench.evaluate import bench_evaluate, format_table

    result = bench_evaluate(zoo_dir=args.zoo, skill=args.skill, repeats=args.repeats, threads=args.threads, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_quality(args: argparse.Namespace) -> int:
    from evomerge.bench.quality import bench_quality, format_table

    result = bench_quality(
        zoo_dir=args.zoo,
        skills=_names(args.skills),
        optimizers=_names(args.optimizers),
        trials=args.trials,
        executor=args.executor,
        workers=args.workers,
        seed=args.seed,
        runs_dir=args.runs_dir,
        limit=args.limit,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_bench_search(args: argparse.Namespace) -> int:
    from evomerge.bench.search import bench_search, format_table

    result = bench_search(
        zoo_dir=args.zoo,
        trials=args.trials,
        ray_workers=_ints(args.workers, "--workers"),
        cpus_per_worker=args.cpus_per_worker,
        optimizer=args.optimizer,
        limit=args.limit,
        memory_params=args.memory_params,
        workdir=args.workdir,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_merge(args: argparse.Namespace) -> int:
    from evomerge.bench.merge import bench_merge, bench_merge_adapters, format_adapter_table, format_table

    methods = args.methods.split(",") if args.methods else None
    if args.adapters is not None:
        if args.adapters < 1:
            raise ConfigError(f"--adapters must be a rank of at least 1, got {args.adapters}")
        result = bench_merge_adapters(n_params=int(args.params), n_adapters=args.sources, rank=args.adapters, repeats=args.repeats,
                                      methods=methods, threads=args.threads, workdir=args.workdir, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else format_adapter_table(result))
        return 0
    result = bench_merge(
        n_params=int(args.params),
        n_sources=args.sources,
        repeats=args.repeats,
        methods=methods,
        dtypes=_names(args.dtypes),
        threads=args.threads,
        workdir=args.workdir,
        first_merge=not args.no_first_merge,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0



def _run_bench_scale(args: argparse.Namespace) -> int:
    from evomerge.bench.scale import bench_scale, format_table

    result = bench_scale(
        params=tuple(_floats(args.params, "--params")),
        sources=tuple(_ints(args.sources, "--sources")),
        methods=_names(args.methods) if args.methods else None,
        configs=tuple(args.config),
        device=args.device,
        device_memory=args.device_memory,
        threads=args.threads,
        workdir=args.workdir,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _run_bench_align(args: argparse.Namespace) -> int:
    from evomerge.align.resolve import resolve_data, resolve_evaluator
    from evomerge.bench.align import bench_align, bench_align_search, format_table

    if args.search and (args.reference or args.model):
        raise ConfigError("bench align --search runs on the zoo only; leave out --reference and --model")
    seeds = _ints(args.seeds, "--seeds")
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    if args.search and len(skills) != 2:
        raise ConfigError(f"--skills: give two skills, A's and B's (got {args.skills!r})")
    alphas = _alpha_grid(args.alphas)  # a bad grid fails before the first row is scored
    evaluators = [resolve_evaluator(args.evaluator)] if args.evaluator else None
    data = resolve_data(args.data) if args.data else None
    result = bench_align(
        zoo_dir=args.zoo, reference=args.reference, model=args.model, evaluators=evaluators, data=data,
        alphas=alphas, steps=args.steps, limit=args.limit, refine=args.refine, progress=not args.json,
    )
    if args.search:
        result["search"] = bench_align_search(
            zoo_dir=args.zoo, work_dir=args.workdir, skills=skills, trials=args.trials, seeds=seeds, progress=not args.json,
        )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0

# --------------------------------------------------------------------------- align
def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "align",
        help="permute a model's hidden units into a reference model's order",
        description="Match the hidden units of --model to those of --reference (residual stream, "
        "MLP neurons, attention heads and value dimensions of Llama-family models) and write "
        "--model with its units permuted: the same outputs, now mergeable with the reference. "
        "Methods: weight (weight matching, no data), activation (activations on --data), "
        "mudsc (alpha * weight + (1 - alpha) * activation similarity; alpha chosen on held-out "
        "data from --alphas unless --alpha is given). --refine N then searches, from that start, "
        "for the permutations whose midpoint merge has the lowest loss on --data.",
    )
    p.add_argument("--reference", required=True, help="model folder (or hub id) whose unit order is kept")
    p.add_argument("--model", required=True, help="model folder (or hub id) to permute")
    p.add_argument("--method", choices=["weight", "activation", "mudsc"], default="mudsc", help="similarity (default: mudsc)")
    p.add_argument("--alpha", type=float, help="mudsc balance between weight (1) and activation (0) similarity")
    p.add_argument("--alphas", default=None, help="comma-separated alphas tried when --alpha is not given (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--data", help="activation data: an evaluator preset or a .jsonl/.json/text file")
    _add_refine_flags(p, "then refine the permutations for this many steps so that merges of the two models have low loss on --data (learned, slower; default: 0, none)")
    p.add_argument("--out", type=Path, required=True, help="output folder; must not exist or be empty")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(handler=_run_align)


def _run_align(args: argparse.Namespace) -> int:
    from evomerge.align import align_folder
    from evomerge.align.resolve import resolve_data

    options: dict[str, Any] = {}
    if args.alphas is not None:
        if args.method != "mudsc":
            raise ConfigError(f"--alphas applies to --method mudsc only; {args.method} has no alpha to choose")
        if args.alpha is not None:
            raise ConfigError("--alphas applies when --alpha is not given; pass one of them")
        options["alphas"] = _alpha_grid(args.alphas)
    data = resolve_data(args.data) if args.data else None
    summary = align_folder(
        args.reference, args.model, args.out, method=args.method, alpha=args.alpha, data=data,
        overwrite=args.overwrite, progress=not args.json, **_refine_options(args), **options,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        refined = summary.get("refine")
        how = f", refined {refined['steps']} steps ({refined['blend']}): held-out midpoint loss {refined['start_loss']:.4g} -> {refined['best_loss']:.4g}" if refined else ""
        print(
            f"aligned {summary['model']} to {summary['reference']} with {summary['method']} "
            f"(alpha {summary['alpha']:g}, {summary['passes']} passes{how}, {summary['seconds']:.1f} s) -> {summary['out']}"
        )
    return 0


def _add_refine_flags(p: argparse.ArgumentParser, what: str, blend: str = "layerwise") -> None:
    from evomerge.align.refine import BLENDS, DEFAULT_LR

    p.add_argument("--refine", type=int, default=0, metavar="STEPS", help=what)
    p.add_argument("--refine-lr", type=float, default=None, help=f"learning rate of the refinement (default: {DEFAULT_LR:g})")
    p.add_argument(
        "--refine-blend", choices=BLENDS, default=None,
        help=f"merges the refinement is trained on: the midpoint, the whole straight path, or per-layer weightings as a search makes them (default: {blend})",
    )
    p.set_defaults(refine_blend_default=blend)


def _refine_options(args: argparse.Namespace) -> dict[str, Any]:
    """--refine, --refine-lr and --refine-blend as align_models takes them (the last two need --refine)."""
    given = {k: v for k, v in (("refine_lr", args.refine_lr), ("refine_blend", args.refine_blend)) if v is not None}
    if given and not args.refine:
        raise ConfigError(f"--{next(iter(given)).replace('_', '-')} applies with --refine only")
    return {"refine": args.refine, "refine_blend": args.refine_blend_default, **given}


def _limit(text: Optional[str]) -> Optional[Union[int, float]]:
    """--limit as the evaluators take it: a count (``50``, ``1``) or a fraction (``0.1``, ``1.0``)."""
    from evomerge.config import check_limit

    if text is None:
        return None
    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--limit {text!r}: expected a count or a fraction") from None
    try:
        return check_limit(value)
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated whole numbers, got {text!r}") from None


def _alpha_grid(text: str) -> list[float]:
    """--alphas as mudsc takes it: comma-separated values in [0, 1], at least one."""
    from evomerge.align.api import alphas_to_try

    alphas = _floats(text, "--alphas")
    try:
        alphas_to_try("mudsc", None, alphas)
    except ConfigError as exc:
        raise ConfigError(f"--alphas: {exc}") from None
    return alphas


# --------------------------------------------------------------------------- interpolate
def _add_interpolate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "interpolate",
        help="score models along the straight path between two models (loss barrier)",
        description="Score (1 - t) * A + t * B at --steps evenly spaced t in [0, 1] with an evaluator, "
        "optionally after aligning B to A, report the barrier (largest drop below the endpoints' "
        "straight line; at the midpoint, the drop below their mean) and save a PNG plot.",
    )
    p.add_argument("a", help="model folder at t = 0 (the reference when aligning)")
    p.add_argument("b", help="model folder at t = 1")
    p.add_argument("--evaluator", required=True, help="evaluator preset, or a .jsonl/text file scored by next-token loss")
    p.add_argument("--metric", help="metric the barrier is measured on (default: the evaluator's first)")
    p.add_argument("--steps", type=int, default=11, help="points on the path, endpoints included (default: 11)")
    p.add_argument("--align", choices=["weight", "activation", "mudsc"], help="align B to A first with this method")
    p.add_argument("--alpha", type=float, help="mudsc alpha (default: chosen on held-out data)")
    p.add_argument("--data", help="activation data for --align (default: the evaluator's)")
    _add_refine_flags(p, "with --align: then refine the permutations for this many steps on the activation data (default: 0, none)", blend="path")
    p.add_argument("--limit", help="evaluate on this many examples (or this fraction, such as 0.1) only")
    p.add_argument("--plot", type=Path, default=Path("interpolation.png"), help="PNG to write (default: interpolation.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_interpolate)


def _run_interpolate(args: argparse.Namespace) -> int:
    from evomerge.align.resolve import resolve_data, resolve_evaluator
    from evomerge.interpolate import interpolate

    limit = _limit(args.limit)
    if args.align is None:
        flags = (("--alpha", args.alpha), ("--data", args.data), ("--refine", args.refine or None), ("--refine-lr", args.refine_lr), ("--refine-blend", args.refine_blend))
        given = [f for f, v in flags if v is not None]
        if given:
            raise ConfigError(f"{given[0]} applies with --align only")
    evaluator = resolve_evaluator(args.evaluator)
    data = None
    if args.align is not None:
        data = resolve_data(args.data) if args.data else resolve_data(args.evaluator)
    metric = args.metric or next(iter(dict(evaluator.metrics)))

    def row(t: float, scores: dict[str, float]) -> None:  # each point as soon as it is scored
        if t == 0.0:
            print(f"{'t':>6}  {getattr(evaluator, 'name', type(evaluator).__name__)}/{metric}", flush=True)
        print(f"{t:6.3f}  {scores[metric]:.4f}", flush=True)

    say = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    r = interpolate(
        args.a, args.b, evaluator, steps=args.steps, align=args.align, alpha=args.alpha, data=data,
        metric=args.metric, limit=limit, plot=args.plot, align_options={"log": say, **_refine_options(args)},
        on_point=None if args.json else row,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    how = ""
    if r["align"]:
        refined = f", refined {r['align']['refine']['steps']} steps" if r["align"].get("refine") else ""
        how = f" after {r['align']['method']} alignment (alpha {r['align']['alpha']:g}{refined})"
    print(f"barrier {r['barrier']:.4f}, at the midpoint {r['midpoint_barrier']:.4f} ({r['direction']} {r['metric']}){how}; plot: {r['plot']}")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the tour: build the offline zoo, search merges of two skills, compare with the usual recipes",
        description="Build (or reuse) the offline zoo, run a multi-objective search (NSGA-II, one "
        "objective per skill) over TIES merges of two specialists on Ray workers, scored on validation; "
        "then print a table on the held-out test split: each specialist, the base, the uniform average, "
        "task arithmetic with the best lambda of a grid, TIES and DARE-TIES, and the searched front "
        "members, with margins. Leaves runs/demo/ (study, Pareto models, plots, quality.json, status.txt). "
        "A second call continues the same run.",
    )
    p.add_argument("--trials", type=int, default=100, help="search budget in trials (default: 100)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers evaluating candidates in parallel (default: 2)")
    p.add_argument("--executor", choices=["ray", "serial"], help="where candidates run (default: ray; a continued run keeps its own)")
    p.add_argument("--optimizer", default="nsga2", help="optimizer of the search: nsga2, cma, tpe, ... (default: nsga2)")
    p.add_argument("--skills", default="reverse,count", help="the two (or more) zoo skills to merge (default: reverse,count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default: 0)")
    p.add_argument("--zoo", type=Path, default=Path("zoo"), help="zoo folder, built if missing (default: zoo)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the run folder demo/ goes (default: runs)")
    p.add_argument("--fresh", action="store_true", help="delete runs/demo first instead of continuing it")
    p.add_argument("--json", action="store_true", help="print the table as JSON (progress and hints go away)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from evomerge.demo import demo

    result = demo(
        runs_dir=args.runs_dir,
        zoo_dir=args.zoo,
        skills=_names(args.skills),
        trials=args.trials,
        workers=1 if args.executor == "serial" else args.workers,
        executor=args.executor,
        optimizer=args.optimizer,
        seed=args.seed,
        fresh=args.fresh,
        quiet=args.json,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Search the best way to merge fine-tuned models: per-layer merge coefficients "
        "found by CMA-ES or Optuna samplers, every trial in an Optuna study, the Pareto front on disk.",
        epilog="New here? `evomerge demo` runs the whole thing offline in a few minutes; then "
        "`evomerge search CONFIG.yaml` (see examples/ and the README). `evomerge VERB --help` for each verb.",
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in _VERBS:
        add(sub)
    return parser


_VERBS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_merge,
    _add_search,
    _add_resume,
    _add_status,
    _add_export,
    _add_dashboard,
    _add_demo,
    _add_zoo,
    _add_evaluate,
    _add_bench,
    _add_align,
    _add_interpolate,
]


# Numeric options that mean a count, wherever a verb has them; --steps counts the
# points of a path, endpoints included. (evaluate and interpolate take --limit as text:
# a count or a fraction, read by _limit.)
_AT_LEAST = {"trials": 1, "workers": 1, "repeats": 1, "sources": 1, "params": 1, "threads": 1, "steps": 3, "limit": 1, "refine": 0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for attr in ("runs_dir", "workdir"):  # every verb's folders for runs, checked before any work
            if getattr(args, attr, None) is not None:
                check_folder_target(getattr(args, attr), "--" + attr.replace("_", "-"))
        for attr, least in _AT_LEAST.items():  # every verb's counts, the same way
            value = getattr(args, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < least:
                raise ConfigError(f"--{attr} must be at least {least:g}, got {value:g}")
        lr = getattr(args, "refine_lr", None)
        if lr is not None and not lr > 0:
            raise ConfigError(f"--refine-lr must be more than 0, got {lr:g}")
        timeout = getattr(args, "timeout", None)
        if timeout is not None and not timeout > 0:  # seconds of wall time; `not >` also catches nan
            raise ConfigError(f"--timeout must be more than 0 seconds, got {timeout:g}")
        return int(args.handler(args) or 0)
    except EvomergeError as exc:
        print(f"evomerge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"evomerge {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
