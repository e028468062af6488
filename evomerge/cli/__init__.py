"""The ``evomerge`` command line: argument parsing and printing only.

Every verb is a few lines over a public library function of the same name, in one
module per verb group (:mod:`~evomerge.cli.runs`, :mod:`~evomerge.cli.merge`, ...).
Errors a user can cause are :class:`~evomerge.errors.EvomergeError`: printed as one
line on stderr, exit code 2, no traceback. Parsers import nothing heavy: torch, optuna
and the rest load only in the handler of the verb that needs them, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from evomerge import __version__
from evomerge.cli import align, bench, evaluate, merge, runs, tour
from evomerge.errors import ConfigError, EvomergeError

Handler = Callable[[argparse.Namespace], int]

_VERBS: list[Callable[[argparse._SubParsersAction], None]] = [
    merge._add_merge,
    runs._add_search,
    runs._add_resume,
    runs._add_status,
    runs._add_export,
    runs._add_dashboard,
    tour._add_demo,
    tour._add_zoo,
    evaluate._add_evaluate,
    bench._add_bench,
    align._add_align,
    align._add_interpolate,
]


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


def check_counts(args: argparse.Namespace) -> None:
    """Every numeric option against the bound its pydantic model declares (run_config.OPTION_BOUNDS)."""
    from evomerge.run_config import OPTION_BOUNDS

    for attr, (model, name) in OPTION_BOUNDS.items():
        value = getattr(args, attr, None)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        info = model.model_fields[name]
        unit = f" {info.description}" if info.description == "seconds" else ""
        for bound in info.metadata:
            ge, gt = getattr(bound, "ge", None), getattr(bound, "gt", None)
            if ge is not None and not value >= ge:
                raise ConfigError(f"--{attr.replace('_', '-')} must be at least {ge:g}{unit}, got {value:g}")
            if gt is not None and not value > gt:  # `not >` also catches nan
                raise ConfigError(f"--{attr.replace('_', '-')} must be more than {gt:g}{unit}, got {value:g}")


def main(argv: Sequence[str] | None = None) -> int:
    from evomerge._paths import check_folder_target

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for attr in ("runs_dir", "workdir"):  # every verb's folders for runs, checked before any work
            if getattr(args, attr, None) is not None:
                check_folder_target(getattr(args, attr), "--" + attr.replace("_", "-"))
        check_counts(args)
        from evomerge.cli._render import rich_progress

        with rich_progress(enabled=not getattr(args, "json", False)):
            return int(args.handler(args) or 0)
    except EvomergeError as exc:
        print(f"evomerge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"evomerge {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
