"""Run the evomerge CLI with phase markers, so a test can SIGKILL it at chosen moments.

Environment: EVOMERGE_PHASE_FILE (phases appended as they start: merge, evaluate,
holdout (an evaluation on the held-out split), pareto_write), EVOMERGE_JOB_LOG (one line per submitted job: trial kind),
EVOMERGE_TARGETS (the two fine-tunes the distance evaluator measures).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import safetensors.torch  # noqa: E402

import evomerge.evaluate  # noqa: E402
from evomerge.execute.serial import SerialExecutor  # noqa: E402
from evomerge.merge.engine import MergeEngine  # noqa: E402
from tests._distance_eval import DistanceEvaluator  # noqa: E402


def mark(path_env: str, text: str) -> None:
    with open(os.environ[path_env], "a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


class SlowDistance(DistanceEvaluator):
    phase = "evaluate"

    def evaluate(self, model, tokenizer, *, limit=None):
        mark("EVOMERGE_PHASE_FILE", self.phase)
        time.sleep(0.05)
        return super().evaluate(model, tokenizer, limit=limit)


def build(preset, split="validation", **options):
    a, b = os.environ["EVOMERGE_TARGETS"].split(os.pathsep)
    ev = SlowDistance({"ft0": a, "ft1": b})
    ev.phase = "evaluate" if split == "validation" else "holdout"
    return ev


evomerge.evaluate.build_evaluator = build
_merge_into = MergeEngine.merge_into


def merge_into(self, model, recipe):
    mark("EVOMERGE_PHASE_FILE", "merge")
    time.sleep(0.05)
    return _merge_into(self, model, recipe)


MergeEngine.merge_into = merge_into
_save = safetensors.torch.save_file


def save_file(tensors, filename, metadata=None):
    if "/pareto/" in str(filename):
        mark("EVOMERGE_PHASE_FILE", "pareto_write")
        _save(tensors, filename, metadata=metadata)
        time.sleep(0.3)  # the folder is half-written now: a kill here must leave nothing visible
        return
    _save(tensors, filename, metadata=metadata)


safetensors.torch.save_file = save_file
_submit = SerialExecutor.submit


def submit(self, job):
    mark("EVOMERGE_JOB_LOG", f"{job.trial} {job.kind}")
    return _submit(self, job)


SerialExecutor.submit = submit

if __name__ == "__main__":
    import signal

    # A shell starts background jobs with SIGINT ignored and children inherit that (so a
    # suite run as `make test &` would never see the test's Ctrl-C): restore Python's own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from evomerge.cli import main

    sys.exit(main(sys.argv[1:]))
