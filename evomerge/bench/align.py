"""``evomerge bench align``: does alignment open a low-loss path between unrelated models?

Two models from different random initializations (by default the zoo's ``base`` and
``base_alt``) are compared on held-out data, side by side:

- each endpoint, and the output ensemble of both (the reference line);
- the midpoint ``(A + B) / 2`` without alignment;
- the midpoint after aligning B to A with ``weight``, ``activation`` and ``mudsc``
  at each alpha of the grid (0 and 1 included), and ``mudsc`` with alpha chosen on
  the validation split;
- that last alignment after learned refinement (``refine`` steps on the midpoint, see
  :mod:`evomerge.align.refine`), trained on the rest of the validation split.

For every metric the *midpoint barrier* is the drop below the endpoints' mean (in
the metric's bad direction; see :mod:`evomerge.interpolate`). The check of issue 8:
after ``mudsc`` (alpha chosen on validation) the midpoint barrier of the primary
metric is at most half the unaligned one; it is made for the plain and for the
refined alignment.

On the zoo, the data are the skills in the generic form the bases were pretrained on
(``add 47+8=``): activations and the choice of alpha use the validation split, the
scores the test split; the primary metric is the loss on answer tokens.

``diagnostics`` say why a barrier stays: the mean activation correlation of matched
units (residual stream, MLP neurons) of B, and of a model fine-tuned from A for
scale; how alike their heads attend (:func:`attention_agreement`); and a control
where a permutation is known to exist (A against a randomly permuted copy of A,
which mudsc must bring back to a zero barrier).

``--search`` (:func:`bench_align_search`) adds acceptance 4's comparison: the same
search over two independently initialized specialists, with and without
``sources.align``, reported on the held-out test split.
"""

from __future__ import annotations

import contextlib
import sys
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
from evomerge.align.permutation import LlamaSpec
from evomerge.align.refine import DEFAULT_STEPS as DEFAULT_REFINE
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
    the next ``fit`` choose alpha, the rest train the refinement; ``limit`` test
    examples (default all) are scored.
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

    def mixed(ps: list[tuple[str, str]]) -> list[tuple[str, str]]:  # every batch a mix of skills
        import random

        random.Random(0).shuffle(ps)
        return ps

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
        "refine_data": batches(mixed(pairs("validation", 2 * fit)), size=32),  # the rest of validation
        "validation": LMLossEvaluator(batches(pairs("validation", fit, 2 * fit)), name="validation"),
        "evaluators": [LMLossEvaluator(batches(test), name="answers"), ExactMatch(test)],
        "control": str(z.models[z.skills[0]]) if a == "base" and z.skills else None,  # fine-tuned from A
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
    refine: int = DEFAULT_REFINE,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the comparison; returns the table as a dict (``format_table`` prints it).

    ``refine`` > 0 adds a row: the mudsc alignment chosen on validation, refined for
    that many steps (:mod:`evomerge.align.refine`), and its check.
    """
    start = time.perf_counter()
    log: Callable[[str], None] = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    validation = None
    control = None
    refine_data = data
    if reference is None and model is None:
        setup = zoo_setup(Path(zoo_dir), limit=limit)
        reference, model, data, control = setup["reference"], setup["model"], setup["data"], setup["control"]
        refine_data = setup["refine_data"]
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
        log(f"{name:<24} midpoint {primary} {mid[primary]:.4g}  barrier {midbar[primary]:.4g}")
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
    mudsc_row = rows[-1]
    if refine:
        chosen_alpha = mudsc_row["alpha"]
        # trained on the midpoint: the merge this table measures (searches refine layerwise)
        res = align_models(ea, eb, method="mudsc", alpha=chosen_alpha, data=refine_data, tokenizer=tok, activations=act, refine=refine, refine_blend="midpoint", log=log)
        extra = {"method": "mudsc", "alpha": res.alpha, "refine": res.refine, "align_seconds": round(res.seconds, 3)}
        rows.append(path_row(f"mudsc (alpha={chosen_alpha:g}) + refine {refine}", res.state_dict, extra))
    unaligned = unaligned_row["midpoint_barrier"][primary]

    def check(row: dict[str, Any]) -> dict[str, Any]:
        chosen = row["midpoint_barrier"][primary]
        return {
            "row": row["row"],
            "metric": primary,
            "unaligned_midpoint_barrier": unaligned,
            "mudsc_midpoint_barrier": chosen,
            "ratio": chosen / unaligned if unaligned > 0 else float("nan"),
            # the same ratio on every metric: whether any of them halves (None: no barrier to halve)
            "ratios": {m: (row["midpoint_barrier"][m] / unaligned_row["midpoint_barrier"][m] if unaligned_row["midpoint_barrier"][m] > 0 else None) for m in directions},
            "pass": bool(unaligned > 0 and chosen <= 0.5 * unaligned),
        }
    why: dict[str, Any] = {}
    if act is not None:
        log("diagnostics: matched unit correlations, and a randomly permuted copy of A")
        why["matched_unit_correlation"] = _unit_correlations(ea, eb, act, data, tok, control)
        why["permuted_copy_of_A"] = _permuted_copy(ea, data, alphas, validation, tok, primary, score, ends[0], directions)
    return {
        "reference": ea.ref,
        "model": eb.ref,
        "metrics": directions,
        "primary": primary,
        "steps": steps,
        "rows": rows,
        "check": check(mudsc_row),
        "check_refined": check(rows[-1]) if refine else None,
        "diagnostics": why,
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
    lines.append("")
    for c, what in ((result["check"], "mudsc"), (result.get("check_refined"), "mudsc + refinement")):
        if not c:
            continue
        lines.append(
            f"midpoint barrier on {c['metric']}: {c['unaligned_midpoint_barrier']:.4f} unaligned, "
            f"{c['mudsc_midpoint_barrier']:.4f} after {what} (ratio {c['ratio']:.3f}; at most 0.5 passes): "
            + ("PASS" if c["pass"] else "FAIL")
        )
        if c.get("ratios"):
            lines.append("  the same ratio on every metric: " + ", ".join(f"{m} {'-' if r is None else f'{r:.3f}'}" for m, r in c["ratios"].items()))
    d = result.get("diagnostics") or {}
    for who, corr in d.get("matched_unit_correlation", {}).items():
        lines.append(f"mean activation correlation of matched units, A vs {who}: residual {corr['residual']:.3f}, MLP {corr['mlp']:.3f}")
        if "attention" in corr:
            att = corr["attention"]
            lines.append(
                f"  attention weights, each head of A vs its closest head of {who.split(' (')[0]}: {att['best_match']:.3f} "
                f"(vs A's own other heads: {att['within_A']:.3f})"
            )
    pc = d.get("permuted_copy_of_A")
    if pc:
        lines.append(
            f"control, A vs a randomly permuted copy of A: midpoint barrier {pc['unaligned_midpoint_barrier']:.4f} unaligned, "
            f"{pc['mudsc_midpoint_barrier']:.4f} after mudsc (alpha {pc['mudsc_alpha']:g})"
        )
    if result.get("search"):
        lines += ["", format_search_table(result["search"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- why (diagnostics)
def matched_correlations(act: dict[str, Any], perms: Any) -> dict[str, float]:
    """Mean activation correlation of each unit of A with the unit of B matched to it.

    ``residual`` and ``mlp`` (averaged over layers) use the permutations' gather
    indices directly; 1.0 means every unit has an exact twin, about 0 none at all.
    """
    res = act["residual"].corr()
    out = {"residual": float(res[torch.arange(res.shape[0]), perms.residual].mean())}
    mlp = [act[f"mlp.{n}"].corr() for n in range(len(perms.mlp))]
    out["mlp"] = float(sum(float(c[torch.arange(c.shape[0]), p].mean()) for c, p in zip(mlp, perms.mlp)) / max(1, len(mlp)))
    return out


@torch.no_grad()
def attention_maps(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Every head's attention weights over the data, one row per head (layer-major).

    A row holds the weight of each (query, key) pair of real tokens, key at or before
    the query, across all sequences: two heads attend alike when their rows correlate.
    """
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa and flash kernels do not return the weights
    try:
        rows = []
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
            maps = model(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
            keep = mask[:, :, None] & mask[:, None, :] & causal  # [batch, query, key]
            rows.append(torch.cat([m.transpose(0, 1)[:, keep] for m in maps]))  # [layers * heads, pairs]
        return torch.cat(rows, dim=1)
    finally:
        model.set_attn_implementation(impl)


def attention_agreement(fa: torch.Tensor, fb: torch.Tensor) -> dict[str, float]:
    """How alike two models attend, from their :func:`attention_maps` over the same data:
    for each head of A, the best correlation of its attention weights with any head of
    B (any layer), averaged over A's heads.

    ``within_A`` is the same for A against its own other heads: a head of B that
    resembles A's heads no more than they resemble each other is no twin of any of
    them, and no permutation of heads or units can make the two models attend alike.
    """

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.double() - x.double().mean(dim=1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    ua, ub = unit(fa), unit(fb)
    own = ua @ ua.T
    own.fill_diagonal_(-1.0)
    return {"best_match": float((ua @ ub.T).max(dim=1).values.mean()), "within_A": float(own.max(dim=1).values.mean())}


def _unit_correlations(ea: Endpoint, eb: Endpoint, act: dict[str, Any], data: Any, tok: Any, control: Optional[str]) -> dict[str, Any]:
    """How alike the two models' units are after activation matching (and, for scale,
    a model fine-tuned from A: the same initialization)."""
    from evomerge.align.matching import match_permutations

    spec = check_alignable(ea, eb)
    out: dict[str, Any] = {}
    batches = token_batches(data, tok)
    maps_a = attention_maps(ea.module(), batches)  # compared with B's and the control's
    match = match_permutations(spec, ea.state, eb.state, alpha=0.0, activations=act)
    out["B (independent init)"] = {
        **matched_correlations(act, match.permutations), "attention": attention_agreement(maps_a, attention_maps(eb.module(), batches))
    }
    if control is not None:
        ec = Endpoint.load(control)
        act_c = activation_moments(ea.module(), ec.module(), batches)
        match_c = match_permutations(spec, ea.state, ec.state, alpha=0.0, activations=act_c)
        out[f"{Path(ec.ref).name} (fine-tuned from A)"] = {
            **matched_correlations(act_c, match_c.permutations), "attention": attention_agreement(maps_a, attention_maps(ec.module(), batches))
        }
    return out


def _permuted_copy(ea: Endpoint, data: Any, alphas: Sequence[float], validation: Any, tok: Any, primary: str, score: Callable, end: dict, directions: dict) -> dict[str, Any]:
    """The control where a permutation is known to exist: A against A with random
    permutations of every kind; mudsc must bring the midpoint barrier back to 0."""
    from evomerge.align.permutation import apply_permutations, random_permutations

    spec = LlamaSpec.from_config(ea.config, where=ea.ref)
    moved = apply_permutations(ea.state, spec, random_permutations(spec, torch.Generator().manual_seed(0)))
    copy_b = ea.scratch()
    load_into(copy_b, moved)
    eb = Endpoint.load(copy_b)
    act = activation_moments(ea.module(), copy_b, token_batches(data, tok))
    res = align_models(ea, eb, method="mudsc", data=data, alphas=alphas, validation=validation, tokenizer=tok, activations=act)
    scratch = ea.scratch()
    out: dict[str, Any] = {"mudsc_alpha": res.alpha}
    for name, state in (("unaligned", moved), ("mudsc", res.state_dict)):
        load_into(scratch, blend(ea.state, state, 0.5))
        mid = score(scratch)[primary]
        sign = 1.0 if directions[primary] == "minimize" else -1.0
        out[f"{name}_midpoint_barrier"] = sign * (mid - end[primary]) + 0.0
    return out


# ----------------------------------------------------------------------------- search with and without alignment
ALIGN_SEARCH_SPACE = "linear_layerwise"


def alt_specialist(zoo_dir: Path, skill: str, work_dir: Path) -> Path:
    """``skill`` fine-tuned from the zoo's ``base_alt`` with the zoo's own specialist recipe.

    Written to ``work_dir/base_alt_<skill>`` (never into the zoo folder) and reused
    while it was made from the same zoo build (its fingerprint is recorded next to it).
    """
    import json
    import os
    import shutil

    from evomerge.zoo import BASE_ALT, ZooRecipe, _train_specialist, load_zoo

    z = load_zoo(zoo_dir)
    assert z is not None
    if skill not in z.skills:
        raise ConfigError(f"bench align --search: unknown skill {skill!r} (the zoo has: {', '.join(z.skills)})")
    out = Path(work_dir) / f"{BASE_ALT}_{skill}"
    stamp = out / "made_from.json"
    want = {"zoo": z.fingerprint, "base": BASE_ALT, "skill": skill}
    try:
        if json.loads(stamp.read_text()) == want and (out / "model.safetensors").is_file():
            return out
    except (OSError, ValueError):
        pass
    raw = dict(z.manifest["recipe"])
    recipe = ZooRecipe(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v for k, v in raw.items()})
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        _train_specialist(recipe, skill, str(z.models[BASE_ALT]), str(z.data_file(skill, "train")), str(tmp))
        (tmp / "made_from.json").write_text(json.dumps(want) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def align_search_config(models: Sequence[str], skills: Sequence[str], *, align: Optional[dict[str, Any]], trials: int, seed: int = 0) -> dict[str, Any]:
    """A zoo search over ``models`` (no base): scored on validation, front re-scored on test."""
    sources: dict[str, Any] = {"models": [str(m) for m in models]}
    if align is not None:
        sources["align"] = dict(align)
    return {
        "sources": sources,
        "search_space": ALIGN_SEARCH_SPACE,
        "evaluators": [{"preset": f"zoo_{s}", "name": s, "split": "validation", "holdout_split": "test"} for s in skills],
        "objectives": [{"metric": f"{s}/accuracy", "direction": "maximize"} for s in skills],
        "scalarization": {"kind": "weighted_sum", "weights": [1.0 / len(skills)] * len(skills)},
        "optimizer": {"name": "cma", "options": {"popsize": 8}},
        "budget": {"trials": trials, "holdout_share": 1.0},  # the held-out table reads every member chosen on validation
        "seed": seed,
        "executor": {"kind": "serial", "workers": 1},
        "keep_pareto_models": False,
    }


def bench_align_search(
    *,
    zoo_dir: Path = Path("zoo"),
    work_dir: Path = Path("runs/bench_align"),
    skills: Sequence[str] = ("add", "reverse"),
    method: str = "mudsc",
    trials: int = 60,
    seeds: Sequence[int] = (0, 1, 2),
    refine: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The same search over two independently initialized specialists, with and without alignment.

    Model A is the zoo's ``skills[0]`` specialist (fine-tuned from ``base``), model B
    ``skills[1]`` fine-tuned from ``base_alt`` (see :func:`alt_specialist`). Both
    searches (CMA-ES on the mean validation accuracy of the two skills, ``trials``
    trials, serial) run once per seed; the aligned one adds
    ``sources.align: {method, data, to: first}`` (activation data: the skills'
    validation prompts with answers). ``refine`` > 0 adds a third search per seed
    whose alignment is refined for that many steps on the same data (``layerwise``
    blends: the weightings such a search makes). Reported: the
    test accuracy of the member best on validation, for each search and seed, their
    mean over seeds, and the endpoints.
    """
    import json
    import shutil

    import yaml

    from evomerge.run.api import create
    from evomerge.zoo import load_zoo, zoo

    start = time.perf_counter()
    log: Callable[[str], None] = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    if len(skills) != 2:
        raise ConfigError(f"bench align --search: give two skills (A's and B's), got {len(skills)}")
    if trials < 1:
        raise ConfigError(f"bench align --search: --trials must be at least 1, got {trials}")
    if not seeds:
        raise ConfigError("bench align --search: no seeds")
    z = load_zoo(zoo_dir, quiet=True) or zoo(zoo_dir, progress=progress)
    for s in skills:
        if s not in z.skills:
            raise ConfigError(f"bench align --search: unknown skill {s!r} (the zoo has: {', '.join(z.skills)})")
    work_dir = Path(work_dir).absolute()
    a = z.models[skills[0]]
    log(f"fine-tuning {skills[1]} from base_alt into {work_dir} (reused when present)")
    b = alt_specialist(z.root, skills[1], work_dir)
    data_file = work_dir / "align_data.jsonl"
    rows = [{"prompt": r["prompt"], "answer": r["answer"] + "\n"} for s in skills for r in z.examples(s, "validation")]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    from evomerge._zoo_model import exact_match
    from transformers import AutoModelForCausalLM

    def test_acc(folder: Path) -> dict[str, float]:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return {f"{s}/accuracy": exact_match(m, [(r["prompt"], r["answer"]) for r in z.examples(s, "test")]) for s in skills}

    endpoints = {f"A ({skills[0]}, from base)": test_acc(a), f"B ({skills[1]}, from base_alt)": test_acc(b)}
    runs_dir = work_dir / "runs"
    plain = {"method": method, "data": str(data_file), "to": "first"}
    variants: list[tuple[str, str, Optional[dict[str, Any]]]] = [("unaligned", "unaligned", None), (f"aligned ({method})", "aligned", plain)]
    if refine:
        variants.append((f"aligned ({method} + refine {refine})", "refined", dict(plain, refine=refine)))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for seed in seeds:
        for name, slug, align in variants:
            run_name = f"{slug}_seed{seed}"
            shutil.rmtree(runs_dir / run_name, ignore_errors=True)
            runs_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = runs_dir / f"{run_name}.yaml"
            cfg_path.write_text(yaml.safe_dump(align_search_config([str(a), str(b)], skills, align=align, trials=trials, seed=seed), sort_keys=False))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stdout if progress else sys.stderr):  # stdout may be --json
                run = create(cfg_path, runs_dir=runs_dir, name=run_name)
                summary = run.run(progress=False)
            front = [p for p in summary["pareto"] if p.get("holdout_values")]
            if not front:
                raise ConfigError(f"bench align --search: the {name} search (seed {seed}) kept no scored member ({summary['n_failed']} trials failed)")
            best = max(front, key=lambda p: sum(p["values"]) / len(p["values"]))
            entry = {
                "seed": seed,
                "trial": best["trial"],
                "validation": dict(zip([f"{s}/accuracy" for s in skills], best["values"])),
                "test": dict(zip([f"{s}/accuracy" for s in skills], best["holdout_values"])),
                "validation_mean": sum(best["values"]) / len(best["values"]),
                "test_mean": sum(best["holdout_values"]) / len(best["holdout_values"]),
                "n_complete": summary["n_complete"],
                "n_failed": summary["n_failed"],
                "seconds": round(time.perf_counter() - t0, 2),
                "run_dir": str(run.run_dir),
            }
            results[name].append(entry)
            log(f"search {name}, seed {seed}: best on validation trial {best['trial']}, test mean accuracy {entry['test_mean']:.4f}")
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    names = [name for name, _, _ in variants]
    un = mean(results[names[0]], "test_mean")

    def check(name: str) -> dict[str, Any]:
        al = mean(results[name], "test_mean")
        return {
            "metric": "test mean accuracy of the best-on-validation member, averaged over seeds",
            "unaligned": un,
            "aligned": al,
            "aligned_wins": sum(x["test_mean"] > y["test_mean"] for x, y in zip(results[name], results[names[0]])),
            "pass": bool(al > un),
        }

    return {
        "a": str(a),
        "b": str(b),
        "skills": list(skills),
        "method": method,
        "search_space": ALIGN_SEARCH_SPACE,
        "optimizer": "cma (mean validation accuracy of the skills)",
        "trials": trials,
        "seeds": list(seeds),
        "endpoints_test": endpoints,
        "searches": results,
        "check": check(names[1]),
        "check_refined": check(names[2]) if refine else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def format_search_table(result: dict[str, Any]) -> str:
    """Endpoints and each search's best-on-validation member: test accuracy per skill."""
    metrics = [f"{s}/accuracy" for s in result["skills"]]
    rows = [(name, scores, None) for name, scores in result["endpoints_test"].items()]
    rows += [(f"search {name}, seed {r['seed']} (trial {r['trial']})", r["test"], r["validation_mean"]) for name, runs in result["searches"].items() for r in runs]
    first = max(len("model (test)"), *(len(r[0]) for r in rows))
    cols = [max(9, len(m)) for m in metrics]
    head = ["model (test)".ljust(first)] + [m.rjust(w) for m, w in zip(metrics, cols)] + ["mean".rjust(7), "val. mean".rjust(9)]
    lines = ["  ".join(head), "  ".join("-" * len(h) for h in head)]
    for name, scores, val in rows:
        mean = sum(scores[m] for m in metrics) / len(metrics)
        cells = [name.ljust(first)] + [f"{scores[m]:.4f}".rjust(w) for m, w in zip(metrics, cols)]
        lines.append("  ".join(cells + [f"{mean:.4f}".rjust(7), ("" if val is None else f"{val:.4f}").rjust(9)]))
    lines.append("")
    for c, what in ((result["check"], result["method"]), (result.get("check_refined"), f"{result['method']} + refinement")):
        if not c:
            continue
        lines.append(
            f"{result['search_space']}, {result['trials']} trials, seeds {', '.join(map(str, result['seeds']))}: test mean accuracy "
            f"{c['unaligned']:.4f} unaligned, {c['aligned']:.4f} aligned ({what}; better in {c['aligned_wins']} of {len(result['seeds'])} seeds): "
            + ("PASS" if c["pass"] else "FAIL")
        )
    return "\n".join(lines)
