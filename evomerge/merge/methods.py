"""Merge methods: one pure tensor function each, and a registry of their specs.

Names, parameters and defaults follow mergekit, so a recipe means the same here and
there. The functions take tensors and plain numbers and return a tensor; the
:class:`~evomerge.merge.engine.MergeEngine` resolves each tensor's parameters from a
recipe, supplies cached task vectors and magnitude statistics, and calls them.

The task-arithmetic family (``task_arithmetic``, ``ties``, ``dare_*``,
``breadcrumbs*``, ``della*``) shares one kernel, :func:`combine_task_vectors`: each
task vector is masked (sparsified), optionally rescaled, weighted, then summed, with
TIES sign consensus where the method asks for it.

Example:
    >>> import torch
    >>> base = torch.zeros(4)
    >>> deltas = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([1.0, 2.0, -1.0, 0.5])]
    >>> combine_task_vectors(base, deltas, [1.0, 1.0], consensus=True, normalize=True)
    tensor([1.0000, 2.0000, 3.0000, 0.5000])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from evomerge.errors import ConfigError

# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ParamSpec:
    """One merge parameter: its type, default, valid range and scope.

    ``shared`` parameters are read from the recipe's global ``parameters`` only;
    the others may be set per model (the base model never takes them).
    """

    name: str
    type: type = float
    default: Any = None
    shared: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    required: bool = False

    def coerce(self, value: Any, where: str = "") -> Any:
        try:
            if self.type is bool:
                if isinstance(value, str):
                    if value.lower() in ("true", "yes", "1"):
                        return True
                    if value.lower() in ("false", "no", "0"):
                        return False
                    raise ValueError(value)
                return bool(value)
            if self.type is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                return float(value)
            if self.type is int:
                return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {self.type.__name__}, got {value!r}") from None
        return value

    def validate(self, value: Any, where: str = "") -> Any:
        v = self.coerce(value, where)
        if self.type in (float, int):
            if not math.isfinite(v):
                raise ConfigError(f"{where}: {v} is not a finite number")
            lo = -math.inf if self.low is None else self.low
            hi = math.inf if self.high is None else self.high
            if not lo <= v <= hi:
                raise ConfigError(f"{where}: {v} is outside [{_fmt(self.low)}, {_fmt(self.high)}]")
        return v


def _fmt(x: Optional[float]) -> str:
    return "-inf" if x is None else f"{x:g}"


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method reads and how; the registry holds one per method name."""

    name: str
    kind: str  # "task_vectors", "linear", "slerp", "nuslerp", "model_stock", "passthrough"
    params: tuple[ParamSpec, ...]
    base: str = "none"  # "required", "optional" or "none"
    min_models: int = 1  # counted over model_refs (base included)
    max_models: Optional[int] = None
    # task-vector family
    sparsify: Optional[str] = None  # "magnitude", "random", "outliers", "della"
    consensus: bool = False
    random: bool = False
    reference: str = ""

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if not p.shared)

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.shared)

    def check_inputs(self, recipe: Any, where: str) -> None:
        """Validate base model and number of inputs against the method's contract."""
        refs = recipe.model_refs
        if self.base == "required" and recipe.base_model is None:
            raise ConfigError(f"{where}: base_model: {self.name} needs a base_model")
        if self.base == "none" and recipe.base_model is not None and self.kind == "linear":
            pass  # mergekit adds the base as one more weighted input
        n_other = len([r for r in refs if r != recipe.base_model])
        if self.kind == "slerp":
            if recipe.base_model is None or len(refs) != 2:
                raise ConfigError(f"{where}: models: slerp needs exactly two models, one of them the base_model")
        elif self.kind == "nuslerp":
            if n_other != 2:
                raise ConfigError(f"{where}: models: nuslerp needs exactly two models besides the base_model")
        elif self.kind == "model_stock":
            if len(refs) < 3:
                raise ConfigError(f"{where}: models: model_stock needs a base_model and at least two other models")
        elif self.kind == "passthrough":
            if len(refs) != 1:
                raise ConfigError(f"{where}: models: passthrough takes exactly one model")
        elif self.kind == "task_vectors" and n_other < 1:
            raise ConfigError(f"{where}: models: {self.name} needs at least one model besides the base_model")


# --------------------------------------------------------------------------- kernels


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted average (``normalize``) or weighted sum of the models' tensors."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    result = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, w in zip(tensors, weights):
        result.add_(tensor.to(dtype) * torch.tensor(w, dtype=dtype))
    if normalize:
        result.div_(torch.tensor(sum(weights), dtype=dtype))
    return result


def magnitude_threshold(sorted_desc: torch.Tensor, density: float) -> Optional[float]:
    """|delta| threshold keeping the top ``density`` fraction (TIES trimming).

    ``sorted_desc`` holds the tensor's magnitudes sorted in descending order (the
    engine caches it, so a new density costs a lookup, not a sort). Returns None
    when everything is kept; ``inf`` when nothing is.
    """
    n = sorted_desc.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return math.inf
    k = max(1, int(density * n))
    return float(sorted_desc[k - 1])


def outlier_band(sorted_desc: torch.Tensor, density: float, gamma: float) -> Optional[tuple[float, float]]:
    """(low, high) |delta| band of Model Breadcrumbs: drop the top ``gamma`` and the smallest.

    The ``gamma`` fraction of largest magnitudes is removed first, then the smallest,
    so that ``density`` of the entries remain (outlier removal shrinks if needed).
    """
    n = sorted_desc.numel()
    if density >= 1:
        return None
    target = int(density * n)
    if target <= 0 or n == 0:
        return (math.inf, math.inf)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    # ascending rank r is descending index n-1-r
    low = float(sorted_desc[n - 1 - n_bot])
    high = float(sorted_desc[n - 1 - (n_bot + target - 1)])
    return (low, high)


def magnitude_mask(delta: torch.Tensor, threshold: Optional[float]) -> Optional[torch.Tensor]:
    if threshold is None:
        return None
    return delta.abs() >= threshold


def band_mask(delta: torch.Tensor, band: Optional[tuple[float, float]]) -> Optional[torch.Tensor]:
    if band is None:
        return None
    mag = delta.abs()
    return (mag >= band[0]) & (mag <= band[1])


UNIFORM_LEVELS = 1 << 16  # random draws are 16-bit integers r: u = (r + 0.5) / 65536


def random_threshold(density: float) -> int:
    """Integer cut on cached uint16 draws: an entry is kept when its draw is below it.

    A draw r in [0, 65536) stands for the uniform value (r + 0.5) / 65536, so the keep
    probability is round(density * 65536) / 65536, within 2**-17 of ``density``.
    """
    return int(round(min(max(density, 0.0), 1.0) * UNIFORM_LEVELS))


def random_mask(draws: torch.Tensor, density: float) -> Optional[torch.Tensor]:
    """DARE's Bernoulli(density) keep mask from uniform integer draws in [0, 65536) (None: keep all)."""
    if density >= 1:
        return None
    return draws < random_threshold(density)


def della_probabilities(rank_norm: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA-MagPrune keep probabilities: linear in each row's magnitude rank.

    ``rank_norm`` is the entry's rank within its row scaled to [0, 1] (0 smallest);
    probabilities run from ``density - epsilon`` to ``density + epsilon``.
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(
            f"della: epsilon {epsilon:g} with density {density:g} must keep density +/- epsilon inside (0, 1)"
        )
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_mask(draws: torch.Tensor, rank_norm: torch.Tensor, density: float, epsilon: float) -> Optional[torch.Tensor]:
    if density >= 1:
        return None
    probs = della_probabilities(rank_norm, density, epsilon)
    return (draws.to(torch.float32) + 0.5) < probs * UNIFORM_LEVELS


def l1_rescale(delta: torch.Tensor, mask: Optional[torch.Tensor], eps: float = 1e-7) -> float:
    """Factor that gives the masked task vector the L1 norm of the full one (mergekit's rescale)."""
    if mask is None:
        return 1.0
    before = float(delta.abs().sum())
    after = float((delta * mask).abs().sum())
    if before < eps or after < eps:
        return 1.0
    return before / after


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


def merge_terms(
    base: torch.Tensor,
    terms: Sequence[torch.Tensor],
    weights: Sequence[Any],
    *,
    consensus: bool,
    normalize: bool,
    lam: Any = 1.0,
) -> torch.Tensor:
    """Sum weighted task vectors onto the base; TIES consensus and normalization.

    ``weights`` may be floats or 0-d tensors, so the function compiles without
    specializing on their values.
    """
    zero = torch.zeros((), dtype=base.dtype)
    one = torch.ones((), dtype=base.dtype)
    if consensus:
        positive = _sum(terms) >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for x, w in zip(terms, weights):
            agree = torch.where(positive, x > 0, x < 0)
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


def slerp_weights(t: float, aa: float, bb: float, ab: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """``(ca, cb)`` with ``slerp(t, a, b) = ca * a + cb * b``, from ``a.a``, ``b.b`` and ``a.b``.

    Nearly collinear pairs (|cos| above ``dot_threshold``) fall back to linear weights.

    >>> [round(w, 4) for w in slerp_weights(0.5, 1.0, 1.0, 0.0)]   # a quarter turn: both at sin(45)/sin(90)
    [0.7071, 0.7071]
    """
    na = math.sqrt(max(aa, 0.0))
    nb = math.sqrt(max(bb, 0.0))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = min(1.0, max(-1.0, ab / (na * nb)))
    return (1.0 - t, t) if abs(dot) > dot_threshold else _sine_weights(t, dot)


def nuslerp_weights(t: float, aa: float, bb: float, ab: float, *, eps: float = 1e-8) -> tuple[float, float]:
    """``(ca, cb)`` of flattened NuSLERP (linear only for exactly collinear vectors)."""
    cos = min(1.0, max(-1.0, ab / (max(math.sqrt(max(aa, 0.0)), 1e-7) * max(math.sqrt(max(bb, 0.0)), 1e-7))))
    return (1.0 - t, t) if 1 - cos * cos <= eps * eps else _sine_weights(t, cos)


def _sine_weights(t: float, cos: float) -> tuple[float, float]:
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, ``t=0`` gives ``v0``.

    Directions come from the flattened tensors; nearly collinear pairs fall back to
    linear interpolation (see :func:`slerp_weights`).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    aa, bb, ab = (float(x) for x in pair_sums(a, b))
    ca, cb = slerp_weights(t, aa, bb, ab, dot_threshold=dot_threshold, eps=eps)
    return (ca * a + cb * b).reshape(v0.shape)


def pair_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[a.a, b.b, a.b]`` over all elements (one fused pass when compiled)."""
    return torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()])


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """NuSLERP: spherical interpolation over the whole tensor, rows or columns."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(a) * unit(b), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin_theta
    out = torch.where(collinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: move from the average toward the base by the task vectors' mean angle."""
    shape = base.shape
    n = len(tensors)
    if not filter_wise:
        ratio = model_stock_ratio(offset_gram(base, list(tensors)).double().tolist(), n)
        return ratio * _sum(list(tensors)) / n + (1 - ratio) * base
    w0 = base.unsqueeze(0) if base.dim() == 1 else base
    offsets = [(w.unsqueeze(0) if w.dim() == 1 else w) - w0 for w in tensors]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos_theta
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    ratio_rows = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    return (ratio_rows * _sum([w.reshape(w0.shape) for w in tensors]) / n + (1 - ratio_rows) * w0).reshape(shape)


def offset_gram(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``(w_i - base) . (w_j - base)`` for every pair i <= j, row by row (one fused pass when compiled)."""
    offsets = [w - base for w in tensors]
    return torch.stack([(a * b).sum() for i, a in enumerate(offsets) for b in offsets[i:]])


def model_stock_ratio(gram: Sequence[float], n: int) -> float:
    """Model Stock's interpolation ratio ``n cos / (1 + (n - 1) cos)`` from :func:`offset_gram`,
    cos the mean cosine of the task vectors' pairs (0 when the denominator vanishes).

    >>> model_stock_ratio([1.0, 0.0, 1.0], 2)    # orthogonal task vectors: stay at the base
    0.0
    """
    it = iter(gram)
    g = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            g[i][j] = g[j][i] = next(it)
    cos = [max(-1.0, min(1.0, g[i][j] / max(math.sqrt(max(g[i][i], 0.0) * max(g[j][j], 0.0)), 1e-6))) for i in range(n) for j in range(i + 1, n)]
    cos_theta = sum(cos) / len(cos)
    denom = 1 + (n - 1) * cos_theta
    return 0.0 if abs(denom) < 1e-6 else n * cos_theta / denom


def passthrough(tensor: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """The one input as is, optionally scaled."""
    return tensor if scale is None else tensor * scale


# --------------------------------------------------------------------------- registry

_UNIT = dict(low=0.0, high=1.0)


def _task_vector_params(default_normalize: bool, default_rescale: bool, extra: tuple[ParamSpec, ...] = ()) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("int8_mask", bool, False, shared=True),
        ParamSpec("normalize", bool, default_normalize, shared=True),
        ParamSpec("rescale", bool, default_rescale, shared=True),
        ParamSpec("lambda", float, 1.0, shared=True),
        ParamSpec("weight", float, None, required=True),
        ParamSpec("density", float, 1.0, **_UNIT),
    ) + extra


_GAMMA = ParamSpec("gamma", float, 0.01, **_UNIT)
_EPSILON = ParamSpec("epsilon", float, 0.15, **_UNIT)


def _tv(name: str, sparsify: Optional[str], consensus: bool, normalize: bool, rescale: bool, ref: str, extra=()) -> MethodSpec:
    return MethodSpec(
        name=name,
        kind="task_vectors",
        params=_task_vector_params(normalize, rescale, extra),
        base="required",
        min_models=2,
        sparsify=sparsify,
        consensus=consensus,
        random=sparsify in ("random", "della"),
        reference=ref,
    )


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "linear",
            "linear",
            (ParamSpec("weight", float, None, required=True), ParamSpec("normalize", bool, True, shared=True)),
            base="none",
            reference="https://arxiv.org/abs/2203.05482",
        ),
        _tv("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
        _tv("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
        _tv("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
        _tv("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
        _tv("breadcrumbs", "outliers", False, False, False, "https://arxiv.org/abs/2312.06795", (_GAMMA,)),
        _tv("breadcrumbs_ties", "outliers", True, False, False, "https://arxiv.org/abs/2312.06795", (_GAMMA,)),
        _tv("della", "della", True, True, True, "https://arxiv.org/abs/2406.11617", (_EPSILON,)),
        _tv("della_linear", "della", False, False, True, "https://arxiv.org/abs/2406.11617", (_EPSILON,)),
        MethodSpec(
            "slerp",
            "slerp",
            (ParamSpec("t", float, None, shared=True, required=True, **_UNIT),),
            base="required",
            min_models=2,
            max_models=2,
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
        MethodSpec(
            "nuslerp",
            "nuslerp",
            (
                ParamSpec("weight", float, None, required=True),
                ParamSpec("nuslerp_row_wise", bool, False, shared=True),
                ParamSpec("nuslerp_flatten", bool, True, shared=True),
            ),
            base="optional",
            min_models=2,
        ),
        MethodSpec(
            "model_stock",
            "model_stock",
            (ParamSpec("filter_wise", bool, False, shared=True),),
            base="required",
            min_models=3,
            reference="https://arxiv.org/abs/2403.19522",
        ),
        MethodSpec("passthrough", "passthrough", (ParamSpec("scale", float, None),), base="none", max_models=1),
    )
}


def get_method(name: str, where: str = "merge_method") -> MethodSpec:
    """The spec of a registered method; one-line error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"{where}: unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def register(spec: MethodSpec) -> None:
    """Add a merge method; names are unique."""
    if spec.name in METHODS:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    METHODS[spec.name] = spec


Kernel = Callable[..., torch.Tensor]
