"""Helpers the verb modules share: option groups and the parsing of lists and limits."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Union

from evomerge.errors import ConfigError


def executor_kinds() -> list[str]:
    """The registered executor kinds (run_config.EXECUTORS: pydantic only, no executor imported)."""
    from evomerge.run_config import EXECUTORS

    return sorted(EXECUTORS)


def _add_executor_options(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--executor", choices=executor_kinds(), help=f"where candidates run (default: {default})")
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


def _trial_ref(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a trial number or 'best', got {text!r}") from None


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


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _alpha_grid(text: str) -> list[float]:
    """--alphas as mudsc takes it: comma-separated values in [0, 1], at least one."""
    from evomerge.align.api import alphas_to_try

    alphas = _floats(text, "--alphas")
    try:
        alphas_to_try("mudsc", None, alphas)
    except ConfigError as exc:
        raise ConfigError(f"--alphas: {exc}") from None
    return alphas


def _add_refine_flags(p: argparse.ArgumentParser, what: str, blend: str = "layerwise") -> None:
    from evomerge.run_config import DEFAULT_REFINE_LR as DEFAULT_LR, REFINE_BLENDS as BLENDS

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
