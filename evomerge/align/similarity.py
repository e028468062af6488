"""Unit similarities: Pearson correlation from pooled moments, in weight or activation space.

A *unit* is one hidden unit of a permutation group (a residual channel, an MLP
neuron, a query/key/value dimension). Its *vector* is everything the model
attaches to it: in weight space, the slices of every tensor that reads or writes
it (a column of q_proj, a row of o_proj, its norm weights...); in activation space,
its values over the tokens of a dataset. Vectors are compared by correlation, so
weight and activation similarities share the scale [-1, 1] and can be mixed, as
dual-space alignment (MuDSC) does: ``S = alpha * S_weight + (1 - alpha) * S_activation``.

Correlations are kept as pooled raw moments (:class:`Moments`): the moments of a
concatenated vector are sums of its pieces' moments, so a unit whose vector spans
several tensors (or several query heads) is scored without building the vector.

Example:
    >>> import torch
    >>> a = torch.randn(3, 50)
    >>> m = Moments.of(a, a[[2, 0, 1]])
    >>> m.corr().argmax(dim=1).tolist()     # unit i of a is unit argmax of b
    [1, 2, 0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_EPS = 1e-12


@dataclass
class Moments:
    """Raw moments of two sets of unit vectors with ``n`` coordinates each (float64)."""

    n: float
    sa: torch.Tensor  # [units_a]   sum of each a-unit's coordinates
    sb: torch.Tensor  # [units_b]
    saa: torch.Tensor  # [units_a]  sum of squares
    sbb: torch.Tensor  # [units_b]
    sab: torch.Tensor  # [units_a, units_b]  cross products

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> "Moments":
        """Moments of unit vectors given as rows: ``a`` is [units_a, n], ``b`` is [units_b, n]."""
        a = a.reshape(a.shape[0], -1).double()
        b = b.reshape(b.shape[0], -1).double()
        return cls(float(a.shape[1]), a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), a @ b.T)

    def __add__(self, other: "Moments") -> "Moments":
        """Moments of the concatenated vectors (each unit's pieces placed end to end)."""
        return Moments(
            self.n + other.n, self.sa + other.sa, self.sb + other.sb, self.saa + other.saa, self.sbb + other.sbb, self.sab + other.sab
        )

    def corr(self) -> torch.Tensor:
        """[units_a, units_b] Pearson correlations (0 for a constant unit)."""
        return correlation(self.n, self.sa, self.sb, self.saa, self.sbb, self.sab)


@dataclass
class MeanOfSites:
    """One unit set seen at several sites (the residual stream after the embedding and
    after every layer): the similarity is the mean of the sites' correlations, so each
    site is standardized on its own and the late layers' larger activations do not
    outweigh the early ones, as pooling the raw values would."""

    sites: list[Moments]

    def corr(self) -> torch.Tensor:
        return torch.stack([m.corr() for m in self.sites]).mean(0)


Activations = dict[str, "Moments | MeanOfSites"]  # what activation_moments returns, per unit set


def add(total: Optional[Moments], part: Moments) -> Moments:
    """``total + part`` where ``total`` may still be empty (None)."""
    return part if total is None else total + part


def correlation(
    n: float, sa: torch.Tensor, sb: torch.Tensor, saa: torch.Tensor, sbb: torch.Tensor, sab: torch.Tensor
) -> torch.Tensor:
    """Correlation from raw moments; callers can pool pieces (sum their moments) first."""
    ma, mb = sa / n, sb / n
    cov = sab / n - ma[:, None] * mb[None, :]
    va = (saa / n - ma * ma).clamp_min(0)
    vb = (sbb / n - mb * mb).clamp_min(0)
    return cov / (va[:, None] * vb[None, :]).sqrt().clamp_min(_EPS)


def mix(weight: Optional[torch.Tensor], activation: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """``alpha * weight + (1 - alpha) * activation``; a side whose factor is 0 may be None."""
    if alpha >= 1.0:
        assert weight is not None, "alpha = 1 needs the weight similarity"
        return weight
    assert activation is not None, "alpha < 1 needs the activation similarity"
    if alpha <= 0.0:
        return activation
    assert weight is not None, "0 < alpha < 1 needs the weight similarity"
    return alpha * weight + (1.0 - alpha) * activation
