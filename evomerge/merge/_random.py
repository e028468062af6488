"""Counter-based random draws for DARE and DELLA masks: computed, never stored.

Entry ``i`` of a tensor gets a 16-bit draw from ``F(i, key)``, where ``key`` comes from
(random_seed, model position, tensor name). Nothing depends on the order tensors are
merged in, on how a tensor is cut into chunks, or on the device: ``F`` is MurmurHash3's
32-bit finalizer applied to ``i * golden + key``, int32 arithmetic whose products wrap
modulo 2**32 on every CPU and GPU, and shifts masked to act as unsigned ones. So a
member scored on a GPU worker is the model ``evomerge merge`` rebuilds on a CPU. One
hash gives two models their draws (its high and low halves, uncorrelated): models 2j
and 2j + 1 share key j. Three products per two draws; a Feistel network of four rounds
of exact 16-bit products (this module's first design) cost three times that. The same
seed gives the same masks (common random numbers), and a mask at a lower density is a
subset of the mask at a higher one.

Example:
    >>> import torch
    >>> key = stream_key(seed=7, index=0, tensor="model.layers.0.mlp.up_proj.weight")
    >>> a = draws16(torch.arange(0, 8, dtype=torch.int32), key)
    >>> b = torch.cat([draws16(torch.arange(0, 3, dtype=torch.int32), key), draws16(torch.arange(3, 8, dtype=torch.int32), key)])
    >>> bool((a == b).all()), int(a.min()) >= 0, int(a.max()) < 65536
    (True, True, True)
    >>> first, second = model_draws(torch.arange(0, 8, dtype=torch.int32), [key, key])  # models 0 and 1
    >>> bool((first == a).all()), bool((second == a).all())
    (True, False)
"""

from __future__ import annotations

import hashlib
from typing import Union

import torch

UNIFORM_LEVELS = 1 << 16  # a draw r in [0, 65536) stands for the uniform value (r + 0.5) / 65536
SEGMENT = 1 << 31  # int32 counters: a tensor's positions are numbered within segments of this size
# 0x9E3779B1 (the golden ratio), 0x85EBCA6B, 0xC2B2AE35 (MurmurHash3's finalizer) as int32
_GOLDEN = -1640531535
_MIX1 = -2048144789
_MIX2 = -1028477387

Key = Union[int, torch.Tensor]  # a signed 32-bit value (a 0-d int32 tensor inside kernels)


def stream_key(seed: int, index: int, tensor: str, segment: int = 0) -> int:
    """The key of the ``index``-th model's tensor (and one 2**31-entry segment of it): a
    signed int32, shared by models ``2j`` and ``2j + 1`` (they take the two halves of one hash)."""
    digest = hashlib.sha256(f"{seed}/{index // 2}/{tensor}/{segment}".encode()).digest()
    return int.from_bytes(digest[:4], "little", signed=True)


def hash32(position: torch.Tensor, key: Key) -> torch.Tensor:
    """MurmurHash3's finalizer of ``position * golden + key`` (int32, wrapping products)."""
    x = position * _GOLDEN + key
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _MIX2
    return x ^ ((x >> 16) & 0xFFFF)


def draws16(position: torch.Tensor, key: Key, half: int = 0) -> torch.Tensor:
    """Uniform integers in [0, 65536) for the entries at ``position`` (int32, within a
    segment): the hash's high half for an even model (``half`` 0), its low half for an odd one."""
    return model_draws(position, [key, key])[half]


def model_draws(position: torch.Tensor, keys: list[Key]) -> list[torch.Tensor]:
    """The draws of models 0, 1, ... (``keys`` from :func:`stream_key`), one hash per pair."""
    out = []
    for i in range(0, len(keys), 2):
        h = hash32(position, keys[i])
        out += [(h >> 16) & 0xFFFF, h & 0xFFFF]
    return out[: len(keys)]


CUT_LEVELS = 1 << 12  # DARE's cuts fall on these levels of the draws (a multiple of 16)
LEVEL_SHIFT = 4  # a draw's cut level: draw >> 4


def random_cut(density: float) -> int:
    """Integer cut on the draws: an entry is kept when its draw is below it.

    The keep probability is round(density * 4096) / 4096, within 2**-13 of ``density``:
    cuts on 4096 levels let a tensor's masked norms for every density come from one
    4096-bin sum of its magnitudes per draw level (:func:`level_of`), with no pass per
    candidate.
    """
    return int(round(min(max(density, 0.0), 1.0) * CUT_LEVELS)) << LEVEL_SHIFT


def level_of(draws: torch.Tensor) -> torch.Tensor:
    """Each draw's cut level in [0, 4096): kept by cut ``c`` exactly when level < c >> 4."""
    return draws >> LEVEL_SHIFT
