"""``evomerge align`` and ``evomerge interpolate``: permutation alignment and loss barriers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from evomerge.cli._common import _add_refine_flags, _alpha_grid, _limit, _refine_options
from evomerge.errors import ConfigError


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
