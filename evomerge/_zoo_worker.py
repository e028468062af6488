"""Zoo training jobs in a worker process: ``python -m evomerge._zoo_worker``.

Reads one job per line on stdin (``{"job": ..., "args": [...]}``), prints ``step N``
lines while training and ``done <losses JSON>`` after each job; exits at end of input.
"""

from __future__ import annotations

import json
import sys


def _recipe(data: dict):
    from evomerge.zoo import ZooRecipe

    return ZooRecipe(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v for k, v in data.items()})


def main() -> int:
    from evomerge import zoo

    jobs = {"_train_base": zoo._train_base, "_train_specialist": zoo._train_specialist}

    def report(_name: str, step: int) -> None:
        print(f"step {step}", flush=True)

    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        args = list(spec["args"])
        args[0] = _recipe(args[0])
        losses = jobs[spec["job"]](*args, report=report)
        print("done " + json.dumps(losses), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
