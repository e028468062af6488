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
from typing import Callable, Sequence

from evomerge import __version__
from evomerge.errors import EvomergeError

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
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(handler=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from evomerge.merge import merge

    summary = merge(
        args.recipe,
        args.out,
        device=args.device,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
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
    p.add_argument("--executor", choices=["serial", "ray"], help="where candidates run (default: the config's, else serial)")
    p.add_argument("--workers", type=int, help="parallel workers (slots); overrides the config")
    p.add_argument("--storage", help="Optuna storage URL (default: a journal file in the run folder)")
    p.add_argument("--seed", type=int, help="seed for the optimizer and random merge methods; overrides the config")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from evomerge.study import SearchRun

    overrides = {}
    if args.trials is not None:
        overrides["budget.trials"] = args.trials
    if args.timeout is not None:
        overrides["budget.timeout"] = args.timeout
    if args.executor is not None:
        overrides["executor.kind"] = args.executor
    if args.workers is not None:
        overrides["executor.workers"] = args.workers
    if args.seed is not None:
        overrides["seed"] = args.seed
    run = SearchRun.create(args.config, runs_dir=args.runs_dir, name=args.name, storage=args.storage, overrides=overrides)
    return _search_and_report(run, args)


def _search_and_report(run, args: argparse.Namespace, **budget) -> int:
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
        print(f"next: evomerge status {run.run_dir} | evomerge dashboard {run.run_dir} | "
              f"evomerge export {run.run_dir} --trial N --out DIR | evomerge resume {run.run_dir} --trials MORE")
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
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=_run_resume)


def _run_resume(args: argparse.Namespace) -> int:
    from evomerge.study import SearchRun

    run = SearchRun.open(args.run_dir, storage=args.storage)
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
    p.add_argument("--trial", type=int, required=True, help="trial number (see evomerge status)")
    p.add_argument("--out", type=Path, required=True, help="output folder; must not exist or be empty")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from evomerge.export import export

    summary = export(args.run_dir, args.trial, args.out, overwrite=args.overwrite, storage=args.storage)
    print(f"wrote trial {args.trial} ({summary['merge_method']}, {summary['n_tensors']} tensors) -> {summary['out']}")
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
        "Llama model with 3 fine-tuned sources, next to the time to copy the bytes the "
        "merge must read and write (the floor). Prints seconds, floor and ratio.",
    )
    m.add_argument("--params", type=float, default=110e6, help="model size in parameters (default: 1.1e8)")
    m.add_argument("--sources", type=int, default=3, help="fine-tuned sources besides the base (default: 3)")
    m.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the median is kept (default: 3)")
    m.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    m.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp folder)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(handler=_run_bench_merge)


def _run_bench_merge(args: argparse.Namespace) -> int:
    from evomerge.bench.merge import bench_merge, format_table

    methods = args.methods.split(",") if args.methods else None
    result = bench_merge(
        n_params=int(args.params),
        n_sources=args.sources,
        repeats=args.repeats,
        methods=methods,
        threads=args.threads,
        workdir=args.workdir,
        progress=not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo: build the offline zoo and merge it",
        description="Build (or reuse) a small offline model family and merge it with "
        "a mergekit-compatible recipe, then load the result with transformers.",
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: runs)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from evomerge.demo import demo

    demo(runs_dir=args.runs_dir)
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Search the best way to merge fine-tuned models.",
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
    _add_bench,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except EvomergeError as exc:
        print(f"evomerge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"evomerge {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
