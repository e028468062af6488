"""Align a model to a reference: match units, permute, optionally write a model folder.

Methods:

``weight``      Git Re-Basin style weight matching (alpha = 1; needs no data);
``activation``  activation matching on a small dataset (alpha = 0);
``mudsc``       dual-space matching, ``S = alpha * S_weight + (1 - alpha) * S_activation``;
                without an alpha, each of ``alphas`` is tried and the one whose
                midpoint merge ``(A + aligned B) / 2`` scores best on validation is kept
                (validation: the given evaluator, else next-token loss on held-out batches).

``refine=N`` then refines any method's permutations for N steps so that merges of the
two models (``refine_blend``: the midpoint, the straight path or per-layer weightings)
have low next-token loss on the data (:mod:`evomerge.align.refine`, Git Re-Basin's
straight-through estimator): slower, but where the similarities find no unit-to-unit
match (independently trained models), it finds permutations that they miss.

Example:
    >>> import torch, transformers
    >>> from evomerge.align.permutation import LlamaSpec, apply_permutations, random_permutations
    >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=20)
    >>> a = transformers.LlamaForCausalLM(cfg)
    >>> spec = LlamaSpec.from_config(cfg.to_dict())
    >>> b = transformers.LlamaForCausalLM(cfg)
    >>> _ = b.load_state_dict(apply_permutations(a.state_dict(), spec, random_permutations(spec, torch.Generator().manual_seed(1))))
    >>> state = align(a, b, method="weight")
    >>> all(state[n].equal(t) for n, t in a.state_dict().items())
    True
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from evomerge.align.activations import activation_moments
from evomerge.align.data import split_batches, token_batches
from evomerge.align.lm_loss import LMLossEvaluator
from evomerge.align.matching import match_permutations
from evomerge.align.models import Endpoint, ModelRef, blend, check_alignable, load_into
from evomerge.align.permutation import LlamaSpec, Permutations, apply_permutations
from evomerge.align.refine import BLENDS, DEFAULT_LR, refine_permutations
from evomerge.align.similarity import Activations
from evomerge.errors import ConfigError

METHODS = ("weight", "activation", "mudsc")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ALIGNMENT_FILE = "alignment.json"


@dataclass
class AlignResult:
    """B's state dict in A's unit order, the permutations that did it, and how they were found."""

    state_dict: dict[str, torch.Tensor]
    permutations: Permutations
    spec: LlamaSpec
    method: str
    alpha: float
    passes: int
    converged: bool
    grid: list[dict[str, Any]] = field(default_factory=list)  # one entry per alpha tried
    seconds: float = 0.0
    refine: Optional[dict[str, Any]] = None  # RefineResult.summary() when refined

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "alpha": self.alpha,
            "passes": self.passes,
            "converged": self.converged,
            "grid": self.grid,
            "refine": self.refine,
            "seconds": round(self.seconds, 3),
        }


def align_models(
    reference: ModelRef,
    model: ModelRef,
    *,
    method: str = "mudsc",
    alpha: Optional[float] = None,
    data: Any = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    validation: Any = None,
    tokenizer: Any = None,
    max_passes: int = 30,
    batch_size: int = 8,
    max_length: int = 128,
    max_examples: Optional[int] = 256,
    activations: Optional[Activations] = None,
    refine: int = 0,
    refine_lr: float = DEFAULT_LR,
    refine_blend: str = "layerwise",
    refine_batch_size: int = 32,
    refine_examples: Optional[int] = 2048,
    log: Optional[Callable[[str], None]] = None,
) -> AlignResult:
    """Permute ``model``'s units into ``reference``'s order (see module docstring).

    ``data`` feeds the activation statistics: token batches, texts, a file or an
    evaluator (see :func:`evomerge.align.data.token_batches`). ``validation`` is an
    evaluator scoring midpoint merges when alpha is chosen from ``alphas``.
    ``activations`` are moments from :func:`~evomerge.align.activations.activation_moments`
    computed beforehand (several alignments of one pair then share them).
    ``refine`` steps of learned refinement follow the matching, on ``data`` (up to
    ``refine_examples`` sequences, ``refine_batch_size`` a step), trained on the
    ``refine_blend`` merges (see :mod:`evomerge.align.refine`).
    """
    start = time.perf_counter()
    tried = alphas_to_try(method, alpha, alphas)
    check_refine(refine, refine_lr, refine_blend)
    if refine and data is None:
        raise ConfigError("refinement needs data to score the merged model on (pass --data: an evaluator or a .jsonl/text file)")
    a, b = Endpoint.load(reference), Endpoint.load(model)
    spec = check_alignable(a, b)
    act = dict(activations) if activations is not None else None
    need_act = any(x < 1.0 for x in tried) and act is None
    choose = len(tried) > 1
    fit: list = []
    held: list = []
    tok = tokenizer if tokenizer is not None else a.tokenizer()
    if need_act or (choose and validation is None):
        if data is None:
            raise ConfigError(f"method {method} needs data for activation statistics (pass --data: an evaluator or a .jsonl/text file)")
        batches = token_batches(data, tok, batch_size=batch_size, max_length=max_length, max_examples=max_examples, tokenizer_of=a.ref)
        fit, held = split_batches(batches) if choose and validation is None else (batches, [])
    if need_act:
        t0 = time.perf_counter()
        if log is not None:
            log(f"activations of both models over {len(fit)} batches ...")
        act = activation_moments(a.module(), b.module(), fit)
        if log is not None:
            log(f"activations: {int(act['mlp.0'].n)} tokens in {time.perf_counter() - t0:.1f} s")
    judge = validation if validation is not None else (LMLossEvaluator(held, name="validation") if choose else None)
    results = []
    scratch = a.scratch() if choose else None
    for x in tried:
        match = match_permutations(spec, a.state, b.state, alpha=x, activations=act, max_passes=max_passes)
        entry: dict[str, Any] = {"alpha": x, "passes": match.passes, "converged": match.converged}
        if choose:
            assert scratch is not None and judge is not None
            load_into(scratch, blend(a.state, apply_permutations(b.state, spec, match.permutations), 0.5))
            metric, direction = next(iter(judge.metrics.items()))
            value = float(judge.evaluate(scratch, tok)[metric])
            entry.update(metric=metric, direction=direction, midpoint=value)
        if log is not None:
            log(f"alpha {x:g}: {match.passes} passes" + (f", midpoint {entry['metric']} {entry['midpoint']:.4g}" if choose else ""))
        results.append((entry, match))
    if choose:
        sign = 1.0 if results[0][0]["direction"] == "maximize" else -1.0
        best_entry, best = max(results, key=lambda r: sign * r[0]["midpoint"])
    else:
        best_entry, best = results[0]
    perms, refined = best.permutations, None
    if refine:
        if log is not None:
            log(f"refining the {method} permutations for {refine} steps ...")
        batches = token_batches(data, tok, batch_size=refine_batch_size, max_length=max_length, max_examples=refine_examples, tokenizer_of=a.ref)
        res = refine_permutations(spec, scratch or a.scratch(), a.state, b.state, perms, batches, steps=refine, lr=refine_lr, blend=refine_blend, log=log)
        perms, refined = res.permutations, res.summary()
    state = apply_permutations(b.state, spec, perms)
    return AlignResult(
        state_dict=state,
        permutations=perms,
        spec=spec,
        method=method,
        alpha=float(best_entry["alpha"]),
        passes=best.passes,
        converged=best.converged,
        grid=[e for e, _ in results],
        seconds=time.perf_counter() - start,
        refine=refined,
    )


def check_refine(steps: Any, lr: Any = DEFAULT_LR, blend: Any = "layerwise") -> None:
    """ConfigError unless ``steps`` is a whole number >= 0, ``lr`` a positive number and ``blend`` known."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"refine takes a whole number of steps (0: none), got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"the refinement learning rate must be a positive number, got {lr!r}")
    check_blend(blend)


def check_blend(blend: Any) -> None:
    """ConfigError unless ``blend`` names one of the refinement blends."""
    if blend not in BLENDS:
        raise ConfigError(f"unknown refinement blend {blend!r} (known: {', '.join(BLENDS)})")


def align(reference: ModelRef, model: ModelRef, *, method: str = "mudsc", alpha: Optional[float] = None, data: Any = None, **options: Any) -> dict[str, torch.Tensor]:
    """``model``'s state dict permuted into ``reference``'s unit order (see :func:`align_models`)."""
    return align_models(reference, model, method=method, alpha=alpha, data=data, **options).state_dict


def align_folder(
    reference: ModelRef,
    model: ModelRef,
    out: Path,
    *,
    method: str = "mudsc",
    alpha: Optional[float] = None,
    data: Any = None,
    overwrite: bool = False,
    progress: bool = False,
    request: Optional[dict[str, Any]] = None,
    **options: Any,
) -> dict[str, Any]:
    """Write ``model`` aligned to ``reference`` as a Hugging Face folder; returns a summary.

    The folder holds the permuted weights (same names and dtypes as the model's),
    its config and tokenizer, ``alignment.json`` (method, alpha, grid, permutations)
    and a model card. It appears complete or not at all. ``request`` (the settings
    that asked for this alignment) is recorded in ``alignment.json`` so a caller can
    tell whether an existing folder already answers its request.
    """
    from safetensors.torch import save_file

    from evomerge.io import atomic_folder, check_output_folder

    out = Path(out)
    check_output_folder(out, overwrite)  # fail before any work
    alphas_to_try(method, alpha, options.get("alphas", DEFAULT_ALPHAS))
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else None
    a, b = Endpoint.load(reference), Endpoint.load(model)
    result = align_models(a, b, method=method, alpha=alpha, data=data, log=log, **options)
    summary = dict(result.summary(), reference=a.ref, model=b.ref, out=str(out))
    with atomic_folder(out, overwrite=overwrite) as tmp:
        save_file({n: t.contiguous() for n, t in result.state_dict.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if b.path is not None:
            for f in ["config.json", "generation_config.json"] + [p.name for p in b.source.tokenizer_files()]:  # type: ignore[union-attr]
                if (b.path / f).is_file():
                    shutil.copy2(b.path / f, tmp / f)
        else:
            b.module().config.save_pretrained(str(tmp))
        record = dict(summary, request=request, permutations=result.permutations.to_json())
        (tmp / ALIGNMENT_FILE).write_text(json.dumps(record) + "\n")
        (tmp / "README.md").write_text(_card(summary))
    return summary


def alphas_to_try(method: str, alpha: Optional[float], alphas: Sequence[float]) -> list[float]:
    """The balance factors to try for a method; ConfigError on a bad combination."""
    if method not in METHODS:
        raise ConfigError(f"unknown alignment method {method!r} (known: {', '.join(METHODS)})")
    if alpha is not None and method != "mudsc":
        raise ConfigError(f"alpha applies to method mudsc only; {method} fixes it at {1.0 if method == 'weight' else 0.0}")
    values = [alpha] if alpha is not None else list(alphas)
    if method == "weight":
        values = [1.0]
    elif method == "activation":
        values = [0.0]
    if not values:
        raise ConfigError("the alpha grid is empty")
    for v in values:
        if not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"alpha must be between 0 and 1, got {v}")
    return [float(v) for v in values]


def _card(summary: dict[str, Any]) -> str:
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags:",
            "- evomerge",
            "- aligned",
            "---",
            "",
            f"# {Path(summary['model']).name} aligned to {Path(summary['reference']).name}",
            "",
            f"The hidden units of `{summary['model']}` were permuted into the order of `{summary['reference']}` "
            f"by evomerge ({summary['method']}, alpha {summary['alpha']:g}"
            + (f", then {summary['refine']['steps']} steps of learned refinement on {summary['refine']['blend']} blends" if summary.get("refine") else "")
            + "). The outputs are unchanged; only the unit order differs, so the two can be merged. "
            "`alignment.json` holds the permutations.",
            "",
        ]
    )
