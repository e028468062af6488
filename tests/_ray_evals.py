"""A ``python`` evaluator for the Ray tests, loaded by file path inside the actors.

``closeness`` scores a merged model by its weight distance to each fine-tune (two
objectives that pull apart), deterministic to the bit. A test steers it while actors run
it: files in a control folder slow every evaluation down (so a worker can be caught
busy) or only one process's (a straggler), and a job's ``limit`` of -1, -2 or -3 makes it
segfault, raise or score infinity.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import yaml

_TARGETS: dict[str, Any] = {}


def closeness(model: Any, tokenizer: Any, *, targets: dict[str, str], control_dir: Optional[str] = None, limit: Optional[float] = None) -> dict[str, float]:
    """1 / (1 + distance) to each target; steered by files in ``control_dir`` and by ``limit``.

    ``control_dir/sleep`` (seconds) slows every evaluation down; ``control_dir/slow-<pid>``
    (seconds) slows down only the process with that pid (a straggler).
    """
    from safetensors.torch import load_file

    if limit == -1:
        os.kill(os.getpid(), signal.SIGSEGV)  # the worker process dies as in a segfault
    if limit == -2:
        raise RuntimeError("boom in evaluate")
    if limit == -3:
        return {k: float("inf") for k in targets}
    if control_dir:
        for name in ("sleep", f"slow-{os.getpid()}"):
            f = Path(control_dir) / name
            if f.exists():
                time.sleep(float(f.read_text() or 0))
    sd = model.state_dict()
    out = {}
    for key, folder in targets.items():
        if folder not in _TARGETS:
            _TARGETS[folder] = load_file(str(Path(folder) / "model.safetensors"))
        sq = sum(float(((sd[n].float() - t.float()) ** 2).sum()) for n, t in _TARGETS[folder].items())
        out[key] = 1.0 / (1.0 + sq**0.5)
    return out


def write_preset(folder: Path, family: list[Path], **options: Any) -> Path:
    """An evaluator file ``closeness.yaml`` (kind python) scoring closeness to family[1] and family[2]."""
    path = Path(folder) / "closeness.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "python",
                "name": "closeness",
                "function": f"{Path(__file__).resolve()}:closeness",
                "metrics": {"ft0": "maximize", "ft1": "maximize"},
                "options": {"targets": {"ft0": str(family[1]), "ft1": str(family[2])}, **options},
            }
        )
    )
    return path
