"""The task-arithmetic family: task arithmetic, TIES, DARE, Breadcrumbs and DELLA.

Each model's task vector (``model - base``, made from the sources chunk by chunk, never
stored) is masked (sparsified), optionally rescaled, weighted, then summed onto the
base, with TIES sign consensus where the method asks for it:

=================== =========== ========= =========== ===================================
method              mask        consensus normalize   rescale (default)
=================== =========== ========= =========== ===================================
task_arithmetic     none        no        no          no
ties                magnitude   yes       yes         no
dare_ties           random      yes       no          yes
dare_linear         random      no        no          yes
breadcrumbs         outliers    no        no          no
breadcrumbs_ties    outliers    yes       no          no
della               della       yes       yes         yes
della_linear        della       no        no          yes
=================== =========== ========= =========== ===================================

The masks need per-tensor statistics: an exact magnitude threshold (magnitude,
outliers: :mod:`evomerge.merge._selection`), a counter-based random draw per entry
(random, della: :mod:`evomerge.merge._random`) and, for DELLA, each entry's magnitude
rank in its row (computed per block of rows). Rescaling gives a masked task vector its
full L1 norm back (mergekit's rescale). DARE's masked norms for any density come from
each task vector's magnitude sums per draw level, kept from the first candidate (its
cuts fall on 4096 levels); DELLA's take one pass per new candidate.

Example:
    >>> base = torch.zeros(4)
    >>> deltas = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([1.0, 2.0, -1.0, 0.5])]
    >>> combine_task_vectors(base, deltas, [1.0, 1.0], consensus=True, normalize=True)
    tensor([1.0000, 2.0000, 3.0000, 0.5000])
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge._kernels import into, scalars
from evomerge.merge._random import CUT_LEVELS, LEVEL_SHIFT, UNIFORM_LEVELS, level_of, model_draws, random_cut
from evomerge.merge.methods.base import MergeMethod, TensorPlan
from evomerge.merge.params import UNIT, WEIGHT, ParamSpec

# --------------------------------------------------------------------------- reference math


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    scales: Optional[Sequence[float]] = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """base + lambda * merge(masked, rescaled, weighted task vectors).

    With ``consensus`` (TIES), each entry takes the sign of the summed weighted
    vectors and only the vectors agreeing with it are added; ``normalize`` divides
    by the sum of the weights of the vectors that were added (of all of them
    without consensus). A zero entry never counts toward the divisor under consensus.
    """
    masks = list(masks) if masks is not None else [None] * len(deltas)
    terms = []
    for i, (d, m, w) in enumerate(zip(deltas, masks, weights)):
        x = d if m is None else torch.where(m, d, torch.zeros((), dtype=d.dtype))
        if scales is not None:
            x = x * scales[i]
        terms.append(x * w)
    return merge_terms(base, terms, weights, consensus=consensus, normalize=normalize, lam=lam)


def merge_terms(base: torch.Tensor, terms: Sequence[torch.Tensor], weights: Sequence[Any], *, consensus: bool, normalize: bool, lam: Any = 1.0) -> torch.Tensor:
    """Sum weighted task vectors onto the base; TIES consensus and normalization.

    ``weights`` may be floats or 0-d tensors, so the function compiles without
    specializing on their values.
    """
    zero = torch.zeros((), dtype=base.dtype)
    one = torch.ones((), dtype=base.dtype)
    if consensus:
        # the elected sign as +-1 (positive on a zero sum): a term agrees when its product
        # with it is positive, one multiply and compare instead of two compares and a select
        sign = torch.where(_sum(terms) >= 0, one, -one)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for x, w in zip(terms, weights):
            agree = x * sign > 0
            mixed = mixed + torch.where(agree, x, zero)
            divisor = divisor + torch.where(agree, w, zero)
        divisor = torch.where(divisor == 0, one, divisor)
    else:
        mixed = _sum(terms)
        divisor = _sum([torch.as_tensor(w, dtype=base.dtype) for w in weights])
        divisor = torch.where(divisor.abs() < 1e-8, one, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lam


def _sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    out = terms[0]
    for x in terms[1:]:
        out = out + x
    return out


def top_rank(density: float, n: int) -> Optional[int]:
    """TIES keeps the ``k`` largest magnitudes: k (1-based rank of the threshold), 0 for
    none, None for all (mergekit: ``k = int(density * numel)``, at least one)."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def band_ranks(density: float, gamma: float, n: int) -> Optional[tuple[int, int]]:
    """Model Breadcrumbs: ranks (from the largest, 1-based) of the band's low and high edges.

    The ``gamma`` fraction of largest magnitudes is removed first, then the smallest,
    so that ``density`` of the entries remain (outlier removal shrinks if needed).
    None keeps everything; (0, 0) keeps nothing.
    """
    if density >= 1:
        return None
    target = int(density * n)
    if target <= 0 or n == 0:
        return (0, 0)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return n - n_bot, n - n_bot - target + 1


def della_probabilities(rank_norm: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA-MagPrune keep probabilities: linear in each row's magnitude rank.

    ``rank_norm`` is the entry's rank within its row scaled to [0, 1] (0 smallest);
    probabilities run from ``density - epsilon`` to ``density + epsilon``.
    """
    check_della(density, epsilon)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def check_della(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"della: epsilon {epsilon:g} with density {density:g} must keep density +/- epsilon inside (0, 1)")


LEVEL_BLOCK = 1 << 20  # entries per step of DARE's per-level sums (eager, about 40 bytes each)
RANK_BLOCK_NUMEL = 1 << 20  # rows sorted at once: the sort's int64 temporaries stay a few MiB


def row_rank_norm(magnitudes: torch.Tensor, row_length: int) -> torch.Tensor:
    """Each entry's magnitude rank within its row, scaled to [0, 1] (0 smallest).

    Ties are ranked by position (a stable sort), so a CPU and a GPU give the same ranks.
    """
    rows = magnitudes.reshape(-1, row_length)
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    step = max(1, RANK_BLOCK_NUMEL // row_length)
    positions = torch.arange(row_length, dtype=torch.float32, device=rows.device) / max(row_length - 1, 1)
    for r in range(0, rows.shape[0], step):
        block = rows[r : r + step]
        order = torch.sort(block, dim=1, stable=True).indices
        out[r : r + step].scatter_(1, order, positions.expand(block.shape))
    return out.reshape(magnitudes.shape)


# --------------------------------------------------------------------------- fused chunk kernels


def _mask(kind: Optional[str], d: torch.Tensor, aux: Sequence[torch.Tensor], draws: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Keep mask from per-tensor statistics, written so torch.compile can fuse it.

    magnitude: aux = (threshold,); outliers: (low, high); random: (start, key, cut);
    della: (start, key, rank_norm, low_prob, span). ``draws`` are the model's draws at
    the chunk's positions (:func:`chunk_draws`). A keep-all setting is expressed by
    thresholds (-inf, cut 65536) rather than by branching, so one compiled kernel
    serves every density.
    """
    if kind is None:
        return None
    if kind == "magnitude":
        return d.abs() >= aux[0]
    if kind == "outliers":
        a = d.abs()
        return (a >= aux[0]) & (a <= aux[1])
    if kind == "random":
        return draws < aux[2]  # int32: no conversion per entry
    if kind == "della":
        return (draws.to(torch.float32) + 0.5) * (1.0 / UNIFORM_LEVELS) < aux[3] + aux[2] * aux[4]
    raise ValueError(kind)


def chunk_draws(kind: Optional[str], n: int, aux: Sequence[Sequence[torch.Tensor]], device: torch.device) -> list[Optional[torch.Tensor]]:
    """Every model's draws on a chunk of ``n`` entries (random and della masks; one hash
    per pair of models), from the chunk's start and the keys in ``aux``."""
    if kind not in ("random", "della"):
        return [None] * len(aux)
    position = torch.arange(n, dtype=torch.int32, device=device) + aux[0][0]
    return model_draws(position, [a[1] for a in aux])


def task_vector_kernel(
    base: torch.Tensor,
    models: list[torch.Tensor],
    aux: list[list[torch.Tensor]],
    weights: list[torch.Tensor],
    scales: Optional[list[torch.Tensor]],
    lam: torch.Tensor,
    kind: Optional[str],
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    b = base.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32)
    draws = chunk_draws(kind, b.shape[0], aux, b.device)
    terms = []
    for i, m in enumerate(models):
        d = m.to(torch.float32) - b
        keep = _mask(kind, d, aux[i], draws[i])
        x = d if keep is None else torch.where(keep, d, zero)
        if scales is not None:
            x = x * scales[i]
        terms.append(x * weights[i])
    return merge_terms(b, terms, weights, consensus=consensus, normalize=normalize, lam=lam)


def masked_l1_kernel(base: torch.Tensor, models: list[torch.Tensor], aux: list[list[torch.Tensor]], kind: Optional[str]) -> torch.Tensor:
    """L1 norms of every masked task vector of one chunk, in one fused pass."""
    b = base.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32)
    draws = chunk_draws(kind, b.shape[0], aux, b.device)
    sums = []
    for m, a, u in zip(models, aux, draws):
        d = m.to(torch.float32) - b
        keep = _mask(kind, d, a, u)
        mag = d.abs()
        sums.append((mag if keep is None else torch.where(keep, mag, zero)).sum())
    return torch.stack(sums)


task_vector_into = into(task_vector_kernel)


# --------------------------------------------------------------------------- methods


class TaskArithmetic(MergeMethod):
    """One member of the family: its mask kind, consensus and defaults (see the table above)."""

    base = "required"

    def __init__(
        self,
        name: str,
        *,
        sparsify: Optional[str] = None,
        consensus: bool = False,
        normalize: bool = False,
        rescale: bool = False,
        reference: str = "",
        extra: tuple[ParamSpec, ...] = (),
    ):
        self.name = name
        self.sparsify = sparsify
        self.consensus = consensus
        self.random = sparsify in ("random", "della")
        self.reference = reference
        self.params = (
            ParamSpec("int8_mask", bool, False, shared=True),
            ParamSpec("normalize", bool, normalize, shared=True),
            ParamSpec("rescale", bool, rescale, shared=True),
            ParamSpec("lambda", float, 1.0, shared=True),
            WEIGHT,
            ParamSpec("density", float, 1.0, **UNIT),
        ) + extra

    def check_inputs(self, recipe: Any, where: str) -> None:
        super().check_inputs(recipe, where)
        if not [r for r in recipe.model_refs if r != recipe.base_model]:
            raise ConfigError(f"{where}: models: {self.name} needs at least one model besides the base_model")

    def check_plan(self, plan: TensorPlan) -> None:
        if self.sparsify == "della":
            for p in plan.per_model.values():
                if 0 < p["density"] < 1:
                    check_della(p["density"], p["epsilon"])

    def linear_coefficients(self, plan: TensorPlan) -> Optional[tuple[float, dict[str, float]]]:
        if self.sparsify is not None:  # masks depend on the values: not linear
            return None
        weights = {m: p["weight"] for m, p in plan.per_model.items()}
        total = sum(weights.values())
        divisor = (total if abs(total) >= 1e-8 else 1.0) if plan.shared["normalize"] else 1.0
        lam = float(plan.shared["lambda"])
        return 1.0, {m: lam * w / divisor for m, w in weights.items()}

    # ------------------------------------------------------------------ kernel
    def merge(self, job: Any) -> None:
        models = list(job.inputs)
        params = [job.per_model[m] for m in models]
        kind = self.sparsify
        static = self._static_masks(job, models, params)
        rescale = bool(job.shared["rescale"]) and kind is not None
        scales = self._l1_scales(job, models, params, static) if rescale else None
        weights = scalars([p["weight"] for p in params])
        lam = torch.tensor(float(job.shared["lambda"]), dtype=torch.float32)
        for a, b in job.chunks(rows=kind == "della"):
            base = job.read(job.base, a, b)
            chunk = [job.read(m, a, b) for m in models]
            aux = [self._chunk_aux(job, i, a, b, static[i], base, chunk[i]) for i in range(len(models))]
            job.run(task_vector_into, job.out_chunk(a, b), base, chunk, aux, weights, scales, lam, kind, self.consensus, bool(job.shared["normalize"]))

    def _static_masks(self, job: Any, models: list[str], params: list[dict]) -> list[list]:
        """Per-model mask settings that hold for the whole tensor (thresholds, cuts)."""
        f32 = dict(dtype=torch.float32)
        n = job.numel
        kind = self.sparsify
        if kind is None:
            return [[] for _ in models]
        if kind in ("magnitude", "outliers"):
            wanted: dict[str, list[int]] = {}
            edges = []
            for m, p in zip(models, params):
                if kind == "magnitude":
                    r = top_rank(p["density"], n)
                    edges.append(r)
                    if r:
                        wanted.setdefault(m, []).append(r)
                else:
                    band = band_ranks(p["density"], p["gamma"], n)
                    edges.append(band)
                    if band and band[0]:
                        wanted.setdefault(m, []).extend(band)
            values = job.order_stats(wanted, 1 if kind == "magnitude" else 2)  # ranks per model: a threshold, a band's edges
            out = []
            for m, e in zip(models, edges):
                if kind == "magnitude":
                    thr = -math.inf if e is None else (math.inf if e == 0 else values[(m, e)])
                    out.append([torch.tensor(thr, **f32)])
                else:
                    lo, hi = (-math.inf, math.inf) if e is None else ((math.inf, math.inf) if e[0] == 0 else (values[(m, e[0])], values[(m, e[1])]))
                    out.append([torch.tensor(lo, **f32), torch.tensor(hi, **f32)])
            return out
        out = []
        for i, p in enumerate(params):
            density = p["density"]
            if kind == "random":
                out.append([torch.tensor(random_cut(density) if density < 1 else UNIFORM_LEVELS, dtype=torch.int32)])
            else:  # della: keep-all at density 1 and keep-none at 0, as mergekit does
                eps = p["epsilon"]
                low, span = (2.0, 0.0) if density >= 1 else ((-1.0, 0.0) if density <= 0 else (density - eps, 2 * eps))
                out.append([torch.tensor(low, **f32), torch.tensor(span, **f32)])
        return out

    def _chunk_aux(self, job: Any, index: int, a: int, b: int, static: list, base: torch.Tensor, model: torch.Tensor) -> list:
        kind = self.sparsify
        if kind not in ("random", "della"):
            return static
        start, key = job.draw_position(index, a)
        if kind == "random":
            return [start, key, static[0]]
        magnitudes = (model.to(torch.float32) - base.to(torch.float32)).abs()
        return [start, key, row_rank_norm(magnitudes, job.row_length), static[0], static[1]]

    def _l1_scales(self, job: Any, models: list[str], params: list[dict], static: list[list]) -> list[torch.Tensor]:
        """mergekit's rescale: give each masked task vector its full L1 norm back."""
        after = self._random_masked_l1(job, models, static) if self.sparsify == "random" else self._masked_l1_pass(job, models, static)
        before = job.delta_l1(models)
        scales = []
        for p, full_l1, masked in zip(params, before, after):
            full = p.get("density", 1.0) >= 1  # mergekit leaves it untouched
            scales.append(1.0 if full or full_l1 < 1e-7 or masked < 1e-7 else full_l1 / masked)
        return scalars(scales)

    def _random_masked_l1(self, job: Any, models: list[str], static: list[list]) -> list[float]:
        """DARE's masked norms for any cut, read off each task vector's magnitude sums per
        draw level (4096 float64 per tensor and model, one pass for the first candidate):
        no pass for the next ones."""
        key = ("draw_levels", job.name, job.base, tuple(models), job.seed)
        below = job.engine.stat(key, lambda: self._level_sums(job, models))  # below[i][L]: entries of level < L
        return [float(b[min(int(s[0]) >> LEVEL_SHIFT, CUT_LEVELS)]) for b, s in zip(below, static)]

    def _level_sums(self, job: Any, models: list[str]) -> list[torch.Tensor]:
        sums = [torch.zeros(CUT_LEVELS, dtype=torch.float64, device=job.engine.device) for _ in models]
        for start, end in job.chunks():
            for a in range(start, end, LEVEL_BLOCK):  # eager: temporaries of a block, not a chunk
                b = min(a + LEVEL_BLOCK, end)
                base = job.read(job.base, a, b).to(torch.float32)
                aux = [list(job.draw_position(i, a)) for i in range(len(models))]
                draws = chunk_draws("random", b - a, aux, base.device)
                for i, m in enumerate(models):
                    magnitudes = (job.read(m, a, b).to(torch.float32) - base).abs().to(torch.float64)
                    sums[i].index_add_(0, level_of(draws[i]), magnitudes)
        zero = torch.zeros(1, dtype=torch.float64)
        return [torch.cat([zero, torch.cumsum(s, 0).cpu()]) for s in sums]

    def _masked_l1_pass(self, job: Any, models: list[str], static: list[list]) -> list[float]:
        """DELLA's masked norms: one pass per new candidate (its keep probabilities depend
        on each entry's rank in its row), kept for the next candidates."""
        keys = [("masked_l1", self.sparsify, job.name, job.base, m, job.seed, i, tuple(float(x) for x in static[i])) for i, m in enumerate(models)]
        after = [job.engine.recall(k) for k in keys]
        if any(a is None for a in after):
            after = [0.0] * len(models)
            for a, b in job.chunks(rows=self.sparsify == "della"):
                base = job.read(job.base, a, b)
                chunk = [job.read(m, a, b) for m in models]
                aux = [self._chunk_aux(job, i, a, b, static[i], base, chunk[i]) for i in range(len(models))]
                sums = job.run(masked_l1_kernel, base, chunk, aux, self.sparsify).double().tolist()
                after = [x + y for x, y in zip(after, sums)]
            for k, a in zip(keys, after):
                job.engine.remember(k, a)
        return after


_GAMMA = ParamSpec("gamma", float, 0.01, **UNIT)
_EPSILON = ParamSpec("epsilon", float, 0.15, **UNIT)
_TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

FAMILY = (
    TaskArithmetic("task_arithmetic", reference=_TASK_ARITHMETIC),
    TaskArithmetic("ties", sparsify="magnitude", consensus=True, normalize=True, reference=_TIES),
    TaskArithmetic("dare_ties", sparsify="random", consensus=True, rescale=True, reference=_DARE),
    TaskArithmetic("dare_linear", sparsify="random", rescale=True, reference=_DARE),
    TaskArithmetic("breadcrumbs", sparsify="outliers", reference=_BREADCRUMBS, extra=(_GAMMA,)),
    TaskArithmetic("breadcrumbs_ties", sparsify="outliers", consensus=True, reference=_BREADCRUMBS, extra=(_GAMMA,)),
    TaskArithmetic("della", sparsify="della", consensus=True, normalize=True, rescale=True, reference=_DELLA, extra=(_EPSILON,)),
    TaskArithmetic("della_linear", sparsify="della", rescale=True, reference=_DELLA, extra=(_EPSILON,)),
)
