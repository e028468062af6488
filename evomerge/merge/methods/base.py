"""The merge-method protocol: a method owns its parameters, input rules, statistics and kernel.

The engine resolves a recipe's parameters for every tensor (a :class:`TensorPlan`),
then hands each tensor to the method as a :class:`~evomerge.merge._job.TensorJob`: the
job reads the sources chunk by chunk, computes per-source statistics once and keeps
them, and writes into the output. A method never holds a whole tensor of a source, so
its memory is a few chunks whatever the model size.

A new method is one file and one registry line::

    class Mean(MergeMethod):
        name = "mean"
        params = ()
        def merge(self, job):
            job.weighted_sum(job.inputs, [1 / len(job.inputs)] * len(job.inputs))

    register(Mean())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from evomerge.errors import ConfigError
from evomerge.merge.params import ParamSpec

if TYPE_CHECKING:
    from evomerge.merge._job import TensorJob


@dataclass(frozen=True)
class TensorPlan:
    """Everything needed to merge one tensor: its layer position and resolved parameters."""

    name: str
    t: float
    shared: dict[str, Any]
    inputs: tuple[str, ...]  # model refs in merge order (empty: copy the reference's tensor)
    per_model: dict[str, dict[str, Any]]


class MergeMethod:
    """Base class of merge methods (see the module docstring)."""

    name: str = ""
    params: tuple[ParamSpec, ...] = ()
    base: str = "none"  # "required", "optional" or "none"
    random: bool = False  # reads the recipe's random_seed
    reference: str = ""

    # ------------------------------------------------------------------ parameters
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

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, recipe: Any, where: str) -> None:
        """Refuse a recipe whose base model or number of models the method cannot merge."""
        if self.base == "required" and recipe.base_model is None:
            raise ConfigError(f"{where}: base_model: {self.name} needs a base_model")

    def inputs(self, recipe: Any) -> tuple[str, ...]:
        """The models the method merges (and gives per-model parameters), in recipe order.

        By default every model but the base: the task-vector methods' reading.
        """
        return tuple(m.model for m in recipe.models if m.model != recipe.base_model)

    def search_inputs(self, models: Sequence[str], base_model: Optional[str]) -> list[str]:
        """The models a search space gives per-model parameters, from a run's sources."""
        return [m for m in models if m != base_model]

    def check_plan(self, plan: TensorPlan) -> None:
        """Per-tensor checks of the resolved parameters, before anything is merged."""

    def linear_coefficients(self, plan: TensorPlan) -> Optional[tuple[float, dict[str, float]]]:
        """For merges linear in the task vectors: ``(b, {model: c})`` with merged =
        ``b * base + sum c * (model - base)`` for this tensor; None otherwise. LoRA
        adapters merge in low-rank form when it exists and ``b`` is 1."""
        return None

    # ------------------------------------------------------------------ cost and kernel
    def traffic(self, n_models: int) -> int:
        """Tensor-sized reads plus writes the method cannot avoid with ``n_models`` models
        besides the base (the floor of ``bench merge``): by default base + models + output."""
        return n_models + 2

    def merge(self, job: "TensorJob") -> None:
        """Write the merged tensor into ``job``'s output."""
        raise NotImplementedError
