"""Every random number of a run derives from its one seed through `derive_seed`.

A derived seed is named by what it is for (`derive_seed(seed, "sample", "coco", 0, 17)` is
the 18th COCO sample of rank 0), so two uses can never collide by accident and no magic
offsets are needed. Names are mixed by content, not by Python's `hash` (which changes
between processes), so the same keys give the same seed on every machine and in every run.
"""

from __future__ import annotations

import zlib

import numpy as np


def _word(key: int | str) -> int:
    """A key as a non-negative integer for SeedSequence: ints as they are (negative ones
    folded), strings by their CRC-32 tagged so that "7" and 7 differ."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"seed keys are ints or strings, got {key!r}")
    if isinstance(key, str):
        return (zlib.crc32(key.encode()) << 1) | 1
    return (key << 1) if key >= 0 else ((-key) << 1) | (1 << 62)


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that is a pure function of `keys` (ints and strings)."""
    if not keys:
        raise ValueError("derive_seed needs at least one key")
    state = np.random.SeedSequence([_word(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
