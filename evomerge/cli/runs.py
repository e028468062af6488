"""The verbs of a run: ``search``, ``resume``, ``status``, ``export``, ``dashboard``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evomerge.cli._common import _add_executor_options, _executor_overrides, _trial_ref
from evomerge.errors import ConfigError, SearchStopped


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


def _run_search(args: argparse.Namespace) -> int:
    from evomerge.run.api import create
    from evomerge.run_config import check_run_name

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
    run = create(args.config, runs_dir=args.runs_dir, name=args.name, storage=args.storage, overrides=overrides, progress=not args.json)
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
        if summary.get("holdout_deferred"):
            print(f"{summary['holdout_deferred']} front members not re-scored on the held-out split yet (budget.holdout_share "
                  f"of the session's worker time was spent); evomerge resume {run.run_dir} re-scores them")
        more = summary["n_complete"] + summary["n_pruned"] + 50  # --trials is a total
        print(f"next: evomerge status {run.run_dir} | evomerge dashboard {run.run_dir} | "
              f"evomerge export {run.run_dir} --trial N --out DIR | evomerge resume {run.run_dir} --trials {more}")
    for line in format_errors(summary.get("errors", [])):
        print(line, file=sys.stderr)
    if summary.get("stopped"):
        # The budget is not spent: say so in the exit code, so that scripts do not take it for a finished run.
        raise SearchStopped(f"stopped early, {summary['stopped']}; fix the cause above, then: evomerge resume {run.run_dir}")
    return 0


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "resume",
        help="continue a run after a crash, Ctrl-C or a finished budget",
        description="Continue a run from its study (the frozen config, the optimizer's state and every "
        "trial live there): trials a crash left RUNNING are marked FAIL and asked again, the optimizer's "
        "state is restored, the Pareto folder is reconciled with the study (missing members rebuilt from "
        "their recipes), and the search runs until its total budget. Give the run folder, or --storage "
        "URL --study NAME to rebuild the folder on any machine. One driver at a time: a second one on "
        "the same study exits 2; one that died is taken over after its heartbeat timeout "
        "(EVOMERGE_LEASE_TIMEOUT seconds, default 60).",
    )
    p.add_argument("run_dir", type=Path, nargs="?", help="the run folder (runs/<name>); or --storage URL --study NAME")
    p.add_argument("--study", help="with --storage: the run's study name; its folder is rebuilt in --runs-dir from the study (any machine)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="with --study: where the run folder is (re)made (default: runs)")
    p.add_argument("--trials", type=int, help="total budget of completed (or pruned) trials; raise it to search longer")
    p.add_argument("--timeout", type=float, help="wall-clock seconds for this session")
    p.add_argument("--workers", type=int, help="parallel workers (slots) for this session")
    _add_executor_options(p, "the run's; these options hold for this session only")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=_run_resume)


def _run_resume(args: argparse.Namespace) -> int:
    from evomerge.run.api import open_search

    run = open_search(args.run_dir, storage=args.storage, study=args.study, runs_dir=args.runs_dir)
    run.use_executor(**_executor_overrides(args))  # this session only
    budget, done = args.trials if args.trials is not None else run.config.budget.trials, run.trials_done()
    if budget is not None and done >= budget:  # --trials is a total, not a number of trials more
        print(f"{run.run_dir}: {done} trials done, budget {budget}: nothing to run; "
              f"--trials is the total, e.g. --trials {done + 50} for 50 more", file=sys.stderr)
    return _search_and_report(run, args, trials=args.trials, timeout=args.timeout, workers=args.workers)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="counts, best values, Pareto front and throughput of a run",
        description="Read a run's study (safe while the search is writing) and print counts by state, "
        "best value per objective, the Pareto front (trial, values, held-out values, path), "
        "hypervolume, throughput and time spent merging vs evaluating.",
    )
    p.add_argument("run_dir", type=Path, nargs="?", help="the run folder (runs/<name>); or --storage URL --study NAME")
    p.add_argument("--storage", help="Optuna storage URL, if the run's was moved (or, with --study, the run's storage)")
    p.add_argument("--study", help="with --storage: read the run straight from its study, no folder needed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from evomerge.status import format_status, status

    s = status(args.run_dir, storage=args.storage, study=args.study)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


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
    p.add_argument("--adapter", action="store_true", help="write one PEFT LoRA adapter instead of a model (exact for linear merges of adapters)")
    p.add_argument("--rank", type=int, help="with --adapter: truncate every merged update to this rank by SVD (any merge); the error is printed")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from evomerge.export import export

    from evomerge.cli.merge import check_rank, say_adapter

    check_rank(args.rank)
    summary = export(args.run_dir, args.trial, args.out, overwrite=args.overwrite, storage=args.storage, adapter=args.adapter, rank=args.rank)
    if "rank" in summary:
        say_adapter(summary, f"trial {summary['trial']}: ")
    else:
        print(f"wrote trial {summary['trial']} ({summary['merge_method']}, {summary['n_tensors']} tensors) -> {summary['out']}")
    return 0


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
