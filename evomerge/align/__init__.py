"""Alignment of models that share no initialization: match hidden units, then merge.

Two independently trained Llama models compute with their hidden units in
unrelated orders, so averaging their weights mixes unrelated units. Alignment
permutes one model's units into the other's order first (outputs unchanged), after
which the straight path between them, and any merge, is meaningful.

- :mod:`~evomerge.align.permutation`: the permutation structure of the Llama family;
- :mod:`~evomerge.align.similarity`, :mod:`~evomerge.align.weights`,
  :mod:`~evomerge.align.activations`: unit similarities in weight and activation space;
- :mod:`~evomerge.align.matching`: linear assignment per group, coordinate descent;
- :mod:`~evomerge.align.api`: ``align``, ``align_models``, ``align_folder``;
- :mod:`~evomerge.align.ensemble`: the output-ensemble reference line;
- :mod:`~evomerge.align.sources`: aligning a run's sources before a search.

Example:
    >>> from evomerge.align import align_folder
    >>> align_folder("zoo/base_alt_a", "zoo/base_alt_b", "aligned_b",
    ...              method="mudsc", data="evaluators/data/val.jsonl")   # doctest: +SKIP
"""

from evomerge.align.api import ALIGNMENT_FILE, DEFAULT_ALPHAS, METHODS, AlignResult, align, align_folder, align_models
from evomerge.align.models import Endpoint, check_alignable
from evomerge.align.permutation import (
    KINDS,
    AttentionPermutation,
    LlamaSpec,
    Permutations,
    apply_permutations,
    identity_permutations,
    random_permutations,
)

__all__ = [
    "ALIGNMENT_FILE",
    "DEFAULT_ALPHAS",
    "KINDS",
    "METHODS",
    "AlignResult",
    "AttentionPermutation",
    "Endpoint",
    "LlamaSpec",
    "Permutations",
    "align",
    "align_folder",
    "align_models",
    "apply_permutations",
    "check_alignable",
    "identity_permutations",
    "random_permutations",
]
