"""``evomerge bench evaluate``: how fast the evaluators score a live zoo model.

Two figures the project promises, measured in the same run:

- ``lm_eval``: the first call (tasks and data loaded, requests built, model wrapped)
  against later calls on the same live model; later calls must take less than a
  third of the first.
- ``dataset``: scoring 500 examples of a zoo skill; must take under a second on two
  cores.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Optional


def bench_evaluate(
    *,
    zoo_dir: Optional[Path] = None,
    skill: str = "add",
    repeats: int = 5,
    threads: Optional[int] = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Time both evaluators on the zoo's ``skill`` specialist (the zoo is built if needed)."""
    import torch

    from evomerge.bench.quality import check_skills
    from evomerge.evaluate import build_evaluator, load_model
    from evomerge.zoo import default_zoo_dir, zoo

    check_skills(None, [skill], flag="--skill", at_least=1)  # before a zoo is built for nothing
    if threads:
        torch.set_num_threads(threads)
    z = zoo(zoo_dir or default_zoo_dir(), progress=progress)
    check_skills(z, [skill], flag="--skill", at_least=1)
    model, tokenizer = load_model(z.models[skill])

    t0 = time.perf_counter()
    lm = build_evaluator("zoo_lm_eval", split="validation", tasks=[f"zoo_{skill}"])
    lm_build = time.perf_counter() - t0
    lm_first, lm_scores = _timed(lm.evaluate, model, tokenizer)
    lm_later = [_timed(lm.evaluate, model, tokenizer)[0] for _ in range(repeats)]

    t0 = time.perf_counter()
    ds = build_evaluator(f"zoo_{skill}", split="validation")
    ds_build = time.perf_counter() - t0
    ds_first, ds_scores = _timed(ds.evaluate, model, tokenizer)
    ds_later = [_timed(ds.evaluate, model, tokenizer)[0] for _ in range(repeats)]

    later = statistics.median(lm_later)
    return {
        "model": str(z.models[skill]),
        "threads": torch.get_num_threads(),
        "lm_eval": {
            "task": f"zoo_{skill}",
            "examples": ds.size,
            "build_s": round(lm_build, 4),
            "first_call_s": round(lm_first, 4),
            "later_calls_s": [round(x, 4) for x in lm_later],
            "later_median_s": round(later, 4),
            "later_over_first": round(later / lm_first, 4),
            "target": "< 0.3333",
            "ok": later < lm_first / 3,
            "scores": lm_scores,
        },
        "dataset": {
            "preset": f"zoo_{skill}",
            "examples": ds.size,
            "build_s": round(ds_build, 4),
            "first_call_s": round(ds_first, 4),
            "later_calls_s": [round(x, 4) for x in ds_later],
            "median_s": round(statistics.median(ds_later), 4),
            "target": "< 1.0 s for 500 examples",
            "ok": statistics.median(ds_later) < 1.0 and ds.size >= 500,
            "scores": ds_scores,
        },
    }


def format_table(result: dict[str, Any]) -> str:
    lm, ds = result["lm_eval"], result["dataset"]
    rows = [
        ("evaluator", "examples", "build s", "first call s", "later calls s", "ratio / target", "ok"),
        ("lm_eval " + lm["task"], str(lm["examples"]), f"{lm['build_s']:.3f}", f"{lm['first_call_s']:.3f}", f"{lm['later_median_s']:.3f}", f"{lm['later_over_first']:.3f} (< 0.333)", "yes" if lm["ok"] else "NO"),
        ("dataset " + ds["preset"], str(ds["examples"]), f"{ds['build_s']:.3f}", f"{ds['first_call_s']:.3f}", f"{ds['median_s']:.3f}", f"{ds['median_s']:.3f} s (< 1 s)", "yes" if ds["ok"] else "NO"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"model {result['model']}, {result['threads']} torch threads; later calls: median of {len(lm['later_calls_s'])}")
    return "\n".join(lines)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out
