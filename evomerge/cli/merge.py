"""``evomerge merge``: a recipe into a model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path



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
