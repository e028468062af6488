"""``evomerge merge``: a recipe into a model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


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

    check_rank(args.rank)
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
        say_adapter(summary)
    else:
        print(
            f"merged {summary['n_tensors']} tensors with {summary['merge_method']} "
            f"in {summary['seconds']:.2f} s -> {summary['out']}"
        )
    return 0


def check_rank(rank: Optional[int]) -> None:
    """--rank, when given, is a positive rank."""
    from evomerge.errors import ConfigError

    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")


def say_adapter(summary: dict, prefix: str = "") -> None:
    """One line for a written adapter: its rank, exact or the SVD truncation's error."""
    how = "exact" if summary["exact"] else f"truncated by SVD, relative error {summary['error']:.3g} (worst tensor {max(summary['errors'].values()):.3g})"
    print(f"{prefix}wrote a rank-{summary['rank']} LoRA adapter of {summary['n_modules']} modules ({how}) in {summary['seconds']:.2f} s -> {summary['out']}")
