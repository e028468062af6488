"""Optimizers: propose merge candidates as trials of an Optuna study.

One protocol (:class:`Optimizer`), one small class per algorithm, one registry
(:data:`OPTIMIZERS`): ``cma`` (pycma CMA-ES, whole generations, IPOP restarts,
resumable) and Optuna's samplers ``tpe``, ``nsga2``, ``nsga3``, ``gp``, ``cmaes``,
``random``. Build one by name with :func:`build_optimizer`.

A new algorithm is one module with a subclass of :class:`Optimizer` decorated with
:func:`register`, plus its import below.
"""

from evomerge.optimize.base import (
    OPTIMIZERS,
    Direction,
    Objective,
    Optimizer,
    Scalarization,
    build_optimizer,
    register,
)
from evomerge.optimize.pycma import CmaOptimizer
from evomerge.optimize.samplers import (
    CmaEsSamplerOptimizer,
    GPOptimizer,
    NSGAIIIOptimizer,
    NSGAIIOptimizer,
    RandomOptimizer,
    SamplerOptimizer,
    TPEOptimizer,
)

__all__ = [
    "OPTIMIZERS",
    "Direction",
    "Objective",
    "Optimizer",
    "Scalarization",
    "build_optimizer",
    "register",
    "CmaOptimizer",
    "SamplerOptimizer",
    "TPEOptimizer",
    "NSGAIIOptimizer",
    "NSGAIIIOptimizer",
    "GPOptimizer",
    "CmaEsSamplerOptimizer",
    "RandomOptimizer",
]
