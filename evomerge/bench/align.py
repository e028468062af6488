"""``evomerge bench align``: does alignment open a low-loss path between unrelated models?

Two models from different random initializations (by default the zoo's ``base`` and
``base_alt``) are compared on held-out data, side by side:

- each endpoint, and the output ensemble of both (the reference line);
- the midpoint ``(A + B) / 2`` without alignment;
- the midpoint after aligning B to A with ``weight``, ``activation`` and ``mudsc``
  at each alpha of the grid (0 and 1 included), and ``mudsc`` with alpha chosen on
  the validation split.

For every metric the *midpoint barrier* is the drop below the endpoints' mean (in
the metric's bad direction; see :mod:`evomerge.interpolate`). The check of issue 8:
after ``mudsc`` (alpha chosen on validation) the midpoint barrier of the primary
metric is at most half the unaligned one.

On the zoo, the data are the skills in the generic form the bases were pretrained on
(``add 47+8=``): activations and the choice of alpha use the validation split, the
scores the test split; the primary metric is the loss on answer tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from evomerge.align.activations import activation_moments
from evomerge.align.api import DEFAULT_ALPHAS, align_models
from evomerge.align.data import token_batches
from evomerge.align.ensemble import EnsembleEvaluator
from evomerge.align.lm_loss import LMLossEvaluator
from evomerge.align.models import Endpoint, blend, check_alignable, load_into
from evomerge.errors import ConfigError
from evomerge.interpolate import barriers


class ExactMatch:
    """Zoo skill accuracy: greedy continuation equals answer + newline (teacher-forced check)."""

    metrics = {"exact_match": "maximize"}

    def __init__(self, pairs: Sequence[tuple[str, str]], name: str = "exact"):
        self.name = name
        self.pairs = list(pairs)

    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[int] = None) -> dict[str, float]:
        from evomerge._zoo_model import exact_match

        with torch.no_grad():
            return {"exact_match": exact_match(model, self.pairs[: limit or None])}


def zoo_setup(zoo_dir: Path, *, limit: Optional[int] = None, fit: int = 64) -> dict[str, Any]:
    """The zoo's alignment pair, activation/validation batches and test evaluators.

    Per skill, the first ``fit`` validation examples feed the activation statistics,
    the next ``fit`` choose alpha; ``limit`` test examples (default all) are scored.
    """
    from evomerge._zoo_data import SKILLS
    from evomerge._zoo_model import PAD_ID, pack, vocab
    from evomerge.zoo import load_zoo, zoo

    z = load_zoo(zoo_dir, quiet=True) or zoo(zoo_dir, progress=True)  # any complete zoo, else the default one
    a, b = z.manifest.get("alignment_pair", ["base", "base_alt"])

    def pairs(split: str, lo: int = 0, hi: Optional[int] = None) -> list[tuple[str, str]]:
        out = []
        for skill in z.skills:
            rows = z.examples(skill, split)[lo:hi]
            out += [(SKILLS[skill].generic_prompt(r["input"]), r["answer"]) for r in rows]
        return out

    def batches(ps: list[tuple[str, str]], size: int = 64) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(ps), size):
            ids, labels = pack(ps[i : i + size], vocab())
            out.append({"input_ids": ids, "attention_mask": (ids != PAD_ID).long(), "labels": labels})
        return out

    test = pairs("test", 0, limit)
    return {
        "reference": str(z.models[a]),
        "model": str(z.models[b]),
        "data": batches(pairs("validation", 0, fit)),
        "validation": LMLossEvaluator(batches(pairs("validation", fit, 2 * fit)), name="validation"),
        "evaluators": [LMLossEvaluator(batches(test), name="answers"), ExactMatch(test)],
    }


def bench_align(
    *,
    zoo_dir: Path = Path("zoo"),
    reference: Optional[str] = None,
    model: Optional[str] = None,
    evaluators: Optional[list[Any]] = None,
    data: Any = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    steps: int = 3,
    limit: Optional[int] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the comparison; returns the table as a dict (``format_table`` prints it)."""
    start = time.perf_counter()
    log: Callable[[str], None] = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    validation = None
    if reference is None and model is None:
        setup = zoo_setup(Path(zoo_dir), limit=limit)
        reference, model, data = setup["reference"], setup["model"], setup["data"]
        evaluators, validation = setup["evaluators"], setup["validation"]
    if reference is None or model is None:
        raise ConfigError("give both --reference and --model, or neither (the zoo's pair)")
    if not evaluators:
        raise ConfigError("no evaluator: pass --evaluator (a preset or a .jsonl/text file)")
    if data is None:
        raise ConfigError("no activation data: pass --data (an evaluator preset or a .jsonl/text file)")
    ea, eb = Endpoint.load(reference), Endpoint.load(model)
    check_alignable(ea, eb)
    tok = ea.tokenizer()
    directions = {f"{e.name}/{m}": d for e in evaluators for m, d in e.metrics.items()}
    primary = next(iter(directions))

    def score(m: Any) -> dict[str, float]:
        return {f"{e.name}/{k}": float(v) for e in evaluators for k, v in e.evaluate(m, tok).items()}

    rows: list[dict[str, Any]] = []
    ends = [score(ea.module()), score(eb.module())]
    rows.append({"row": f"A ({Path(ea.ref).name})", "kind": "endpoint", "scores": ends[0]})
    rows.append({"row": f"B ({Path(eb.ref).name})", "kind": "endpoint", "scores": ends[1]})
    ens = {}
    for e in evaluators:
        ens.update({f"{e.name}/{k}": float(v) for k, v in EnsembleEvaluator(e).evaluate([ea.module(), eb.module()], tok).items()})
    rows.append({"row": "ensemble (A, B)", "kind": "ensemble", "scores": ens})
    log(f"endpoints and ensemble scored ({primary}: A {ends[0][primary]:.4g}, B {ends[1][primary]:.4g}, ensemble {ens[primary]:.4g})")

    scratch = ea.scratch()
    ts = [i / (steps - 1) for i in range(steps)]

    def path_row(name: str, state_b: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
        path = []
        for t in ts:
            if t in (0.0, 1.0):
                path.append(ends[int(t)])
                continue
            load_into(scratch, blend(ea.state, state_b, t))
            path.append(score(scratch))
        mid = path[min(range(len(ts)), key=lambda i: abs(ts[i] - 0.5))]
        bar, midbar = {}, {}
        for metric, direction in directions.items():
            bar[metric], midbar[metric] = barriers(ts, [p[metric] for p in path], direction)
        row = {"row": name, "kind": "midpoint", "scores": mid, "midpoint_barrier": midbar, "barrier": bar, **extra}
        log(f"{name:<22} midpoint {primary} {mid[primary]:.4g}  barrier {midbar[primary]:.4g}")
        return row

    rows.append(path_row("no alignment", eb.state, {"method": None}))
    unaligned_row = rows[-1]
    # one set of activation statistics serves every method and alpha
    act = activation_moments(ea.module(), eb.module(), token_batches(data, tok)) if any(a < 1 for a in alphas) else None
    runs: list[tuple[str, str, Optional[float]]] = [("weight", "weight", None), ("activation", "activation", None)]
    runs += [(f"mudsc alpha={a:g}", "mudsc", float(a)) for a in alphas]
    runs.append(("mudsc (alpha on val.)", "mudsc", None))
    for name, method, alpha in runs:
        res = align_models(ea, eb, method=method, alpha=alpha, data=data, alphas=alphas, validation=validation, tokenizer=tok, activations=act)
        extra = {"method": method, "alpha": res.alpha, "passes": res.passes, "converged": res.converged, "align_seconds": round(res.seconds, 3)}
        if method == "mudsc" and alpha is None:
            extra["grid"] = res.grid
            name = f"mudsc (alpha={res.alpha:g} on val.)"
        rows.append(path_row(name, res.state_dict, extra))
    unaligned = unaligned_row["midpoint_barrier"][primary]
    chosen = rows[-1]["midpoint_barrier"][primary]
    ratio = chosen / unaligned if unaligned > 0 else float("nan")
    return {
        "reference": ea.ref,
        "model": eb.ref,
        "metrics": directions,
        "primary": primary,
        "steps": steps,
        "rows": rows,
        "check": {
            "metric": primary,
            "unaligned_midpoint_barrier": unaligned,
            "mudsc_midpoint_barrier": chosen,
            "ratio": ratio,
            "pass": bool(unaligned > 0 and chosen <= 0.5 * unaligned),
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def format_table(result: dict[str, Any]) -> str:
    """One row per model: every metric, and the primary metric's midpoint barrier."""
    metrics = list(result["metrics"])
    primary = result["primary"]
    first = max(len("model"), *(len(r["row"]) for r in result["rows"]))
    cols = [max(9, len(m)) for m in metrics]
    head = ["model".ljust(first)] + [m.rjust(w) for m, w in zip(metrics, cols)] + ["barrier".rjust(9)]
    lines = ["  ".join(head), "  ".join("-" * len(h) for h in head)]
    for r in result["rows"]:
        cells = [r["row"].ljust(first)] + [f"{r['scores'][m]:.4f}".rjust(w) for m, w in zip(metrics, cols)]
        b = r.get("midpoint_barrier", {}).get(primary)
        cells.append(("" if b is None else f"{b:.4f}").rjust(9))
        lines.append("  ".join(cells))
    c = result["check"]
    lines.append("")
    lines.append(
        f"midpoint barrier on {c['metric']}: {c['unaligned_midpoint_barrier']:.4f} unaligned, "
        f"{c['mudsc_midpoint_barrier']:.4f} after mudsc (ratio {c['ratio']:.3f}; at most 0.5 passes): "
        + ("PASS" if c["pass"] else "FAIL")
    )
    return "\n".join(lines)
