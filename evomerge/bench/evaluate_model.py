"""``evomerge bench evaluate --model DIR --evaluator PRESET``: evomerge's scorer against
lm-eval's HF backend on the same model and data, and both against the machine's matmul rate.

In one run, on one live model:

- evomerge's ``dataset`` evaluator (``multiple_choice`` or ``generate``) scores the rows;
- lm-eval (``simple_evaluate`` with its ``HFLM`` wrapping the same model) scores the same
  rows through a task YAML written over them (:mod:`evomerge.bench.lm_eval_task`); its time is the
  time spent in the backend's ``loglikelihood`` / ``generate_until`` (the total, with
  task building and data loading, is reported beside it);
- a float matmul measures what the machine's cores (or GPU) do at best.

The repeats alternate between the two scorers, so that both see the same load on a
shared machine, and the best time of each is kept.

Forward hooks on the input embeddings and the LM head count what each scorer made the
model compute: tokens through the body and rows through the head. Their FLOPs
(2 x body parameters per token, 2 x hidden x vocab per head row; attention's own
quadratic term left out) over the wall time, divided by the matmul rate, is the
fraction of peak. Scored tokens (the choices' tokens, or the targets') per second is the
same numerator for both, so its ratio is the throughput ratio.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from evomerge.errors import ConfigError


def matmul_flops(*, device: str = "cpu", n: int = 1024, seconds: float = 1.0) -> float:
    """Float32 matmul FLOP/s of this machine (torch's threads), best of a ``seconds`` loop."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


class _Work:
    """Tokens through the model's body and rows through its head (forward hooks)."""

    def __init__(self, model: Any):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body_tokens = self.head_rows = 0
        emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
        self.hidden, self.vocab = int(head.weight.shape[1]), int(head.weight.shape[0])
        skip = {id(p) for p in emb.parameters()} | {id(p) for p in head.parameters()}
        self.body_params = sum(p.numel() for p in inner.parameters() if id(p) not in skip)
        self._hooks = [emb.register_forward_hook(self._body), head.register_forward_hook(self._head)]

    def _body(self, module: Any, args: Any, out: Any) -> None:
        self.body_tokens += int(args[0].numel())

    def _head(self, module: Any, args: Any, out: Any) -> None:
        self.head_rows += int(args[0].numel() // args[0].shape[-1])

    def flops(self) -> float:
        return 2.0 * self.body_params * self.body_tokens + 2.0 * self.hidden * self.vocab * self.head_rows

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _timed(model: Any, fn: Any) -> tuple[float, Any, _Work]:
    work = _Work(model)
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out, work
    finally:
        work.close()


def _time_requests(lm: Any) -> dict[str, float]:
    """Time spent in the HF backend's scoring methods (the model's work, not task building)."""
    spent = {"seconds": 0.0}
    for name in ("loglikelihood", "generate_until"):
        method = getattr(type(lm), name).__get__(lm)

        def timed(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - t0

        setattr(lm, name, timed)
    return spent


def _scored_tokens(evaluator: Any, tokenizer: Any, rows: list[int]) -> int:
    """Tokens whose probability is scored: every choice's, or every target's (with its stop)."""
    from evomerge.evaluate import _scoring

    c = evaluator.config
    if c.mode == "multiple_choice":
        return sum(len(_scoring.encode_pair(tokenizer, evaluator.prompts[i], ch, c.add_special_tokens)[1]) for i in rows for ch in evaluator.choices[i])
    return sum(len(_scoring.encode_pair(tokenizer, evaluator.prompts[i], evaluator.targets[i] + (c.stop or ""), c.add_special_tokens)[1]) for i in rows)


def bench_evaluate_model(
    model_dir: Path,
    evaluator: str,
    *,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    options: Optional[dict] = None,
    batch_size: Optional[int] = None,
    threads: Optional[int] = 2,
    device: str = "cpu",
    repeats: int = 3,
) -> dict[str, Any]:
    """Score ``model_dir`` with ``evaluator`` (a ``dataset`` preset) and with lm-eval's HF
    backend on the same rows; times, accuracies, scored tokens per second, fraction of peak."""
    import torch

    from evomerge.bench.lm_eval_task import write_task
    from evomerge.evaluate import build_evaluator, load_model, subset_indices

    if threads:
        torch.set_num_threads(threads)
    overrides = dict(options or {})
    if split:
        overrides["split"] = split
    if batch_size:
        overrides["batch_size"] = batch_size
    ev = build_evaluator(evaluator, **overrides)
    if getattr(ev, "kind", None) != "dataset":
        raise ConfigError(f"bench evaluate: --evaluator {evaluator}: a dataset evaluator is needed (multiple_choice or generate), not {getattr(ev, 'kind', type(ev).__name__)}")
    keep = subset_indices(ev.size, limit if limit is not None else ev.config.limit, ev.config.seed)
    rows = list(range(ev.size)) if keep is None else list(keep)
    model, tokenizer = load_model(model_dir, device=device)
    peak = matmul_flops(device=device)

    ev.evaluate(model, tokenizer, limit=limit)  # warm-up: token ids are prepared once per tokenizer

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.evaluate.lm_harness import _quiet_lm_eval

    _quiet_lm_eval()
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        task = write_task(ev, rows, Path(tmp), "evomerge_bench")
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.config.batch_size, device=device)
        scoring = _time_requests(lm)

        def theirs_once() -> tuple[float, float, Any, _Work]:
            scoring["seconds"] = 0.0
            total_s, res, work = _timed(model, lambda: lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=False, verbosity="ERROR"))
            return scoring["seconds"], total_s, res, work

        ours_runs, theirs_runs = [], []
        for _ in range(repeats):  # alternated: on a shared machine both sides see the same load
            ours_runs.append(_timed(model, lambda: ev.evaluate(model, tokenizer, limit=limit)))
            theirs_runs.append(theirs_once())
            peak = max(peak, matmul_flops(device=device))  # the best rate, like the best times
    ours_s, ours, ours_work = min(ours_runs, key=lambda r: r[0])  # the best of the repeats: a shared machine only slows
    theirs_s, total_s, res, theirs_work = min(theirs_runs, key=lambda r: r[0])
    theirs = {k.split(",")[0]: v for k, v in res["results"][task].items() if k.split(",")[0] in ("acc", "acc_norm", "exact_match")}

    scored = _scored_tokens(ev, tokenizer, rows)

    def side(seconds: float, scores: dict, work: _Work) -> dict[str, Any]:
        return {
            "seconds": round(seconds, 5),  # a small task takes tens of milliseconds
            "scores": scores,
            "scored_tokens_per_s": round(scored / seconds, 1),
            "body_tokens": work.body_tokens,
            "head_rows": work.head_rows,
            "gflops": round(work.flops() / 1e9, 2),
            "fraction_of_peak": round(work.flops() / seconds / peak, 4),
        }

    c = ev.config
    return {
        "model": str(model_dir),
        "evaluator": evaluator,
        "mode": c.mode,
        "decoding": None if c.mode != "generate" else ev.decoding_used(),
        "examples": len(rows),
        "repeats": repeats,
        "scored_tokens": scored,
        "device": device,
        "threads": torch.get_num_threads(),
        "matmul_gflops": round(peak / 1e9, 2),
        "evomerge": side(ours_s, ours, ours_work),
        "lm_eval": side(theirs_s, theirs, theirs_work),
        "lm_eval_total_seconds": round(total_s, 3),  # with task building and data loading
        "speedup": round(theirs_s / ours_s, 2),
    }


def format_table(r: dict[str, Any]) -> str:
    rows = [("scorer", "seconds", "scores", "scored tok/s", "body tokens", "head rows", "GFLOP", "of peak")]
    for name in ("evomerge", "lm_eval"):
        s = r[name]
        scores = " ".join(f"{k}={v:.4f}" for k, v in s["scores"].items() if isinstance(v, (int, float)))
        rows.append((name, f"{s['seconds']:.2f}", scores, f"{s['scored_tokens_per_s']:.0f}", str(s["body_tokens"]), str(s["head_rows"]), f"{s['gflops']:.1f}", f"{100 * s['fraction_of_peak']:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mode = r["mode"] + (f" ({r['decoding']})" if r["decoding"] else "")
    lines.append(
        f"{r['evaluator']} on {r['model']}: {mode}, {r['examples']} examples, {r['scored_tokens']} scored tokens; "
        f"evomerge {r['speedup']:.2f}x lm-eval's throughput; matmul peak {r['matmul_gflops']:.1f} GFLOP/s "
        f"({r['device']}, {r['threads']} threads)"
    )
    return "\n".join(lines)
