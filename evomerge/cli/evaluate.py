"""``evomerge evaluate``: score a model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evomerge.cli._common import _limit


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
