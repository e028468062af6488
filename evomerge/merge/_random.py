"""Counter-based random draws for DARE and DELLA masks: computed, never stored.

Entry ``i`` of a tensor gets the 16-bit draw ``F(i, key)``, where ``key`` comes from
(random_seed, model position, tensor name). Nothing depends on the order tensors are
merged in, on how a tensor is cut into chunks, or on the device: ``F`` is a small
Feistel network on the two 16-bit halves of ``i`` whose products stay below 2**31, so
it is exact int32 arithmetic that CPUs (vectorized) and GPUs do alike, and a member
scored on a GPU worker is the model ``evomerge merge`` rebuilds on a CPU. The same seed
gives the same masks (common random numbers), and a mask at a lower density is a
subset of the mask at a higher one.

Example:
    >>> import torch
    >>> key = stream_key(seed=7, index=0, tensor="model.layers.0.mlp.up_proj.weight")
    >>> a = draws16(torch.arange(0, 8, dtype=torch.int32), key)
    >>> b = torch.cat([draws16(torch.arange(0, 3, dtype=torch.int32), key), draws16(torch.arange(3, 8, dtype=torch.int32), key)])
    >>> bool((a == b).all()), int(a.min()) >= 0, int(a.max()) < 65536
    (True, True, True)
"""

from __future__ import annotations

import hashlib

import torch

UNIFORM_LEVELS = 1 << 16  # a draw r in [0, 65536) stands for the uniform value (r + 0.5) / 65536
SEGMENT = 1 << 31  # int32 counters: a tensor's positions are numbered within segments of this size
ROUNDS = 4
_MUL1 = 0x6A09  # both below 2**15: a 16-bit value times either stays below 2**31
_MUL2 = 0x3C6F

Key = tuple[int, ...]  # ROUNDS round keys of 16 bits


def stream_key(seed: int, index: int, tensor: str, segment: int = 0) -> Key:
    """Round keys for one model's tensor (and one 2**31-entry segment of it)."""
    digest = hashlib.sha256(f"{seed}/{index}/{tensor}/{segment}".encode()).digest()
    return tuple(int.from_bytes(digest[2 * r : 2 * r + 2], "little") for r in range(ROUNDS))


def draws16(position: torch.Tensor, key: Key) -> torch.Tensor:
    """Uniform integers in [0, 65536) for the entries at ``position`` (int32, within a segment)."""
    left = (position >> 16) & 0xFFFF
    right = position & 0xFFFF
    for k in key:
        f = (((right ^ k) * _MUL1) >> 7) & 0xFFFF
        f = f ^ (((f * _MUL2) >> 11) & 0xFFFF)
        left, right = right, left ^ f
    return (left ^ right) & 0xFFFF


def random_cut(density: float) -> int:
    """Integer cut on the draws: an entry is kept when its draw is below it.

    The keep probability is round(density * 65536) / 65536, within 2**-17 of ``density``.
    """
    return int(round(min(max(density, 0.0), 1.0) * UNIFORM_LEVELS))
