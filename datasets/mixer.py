"""Mixing per-dataset streams by ratio, with the realised mix recorded.

Written by hand rather than with webdataset's `RandomMix` because `RandomMix` draws from the
global `random` module: any other user of that module (a library, a transform) changes which
dataset comes next, so a run is not reproducible from its seed, and its draws are not counted.
Here every draw comes from this mixer's own `random.Random(seed)`.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Mixer(Generic[T]):
    """Yields `(dataset_name, item)` pairs, choosing each item's dataset at random by ratio.

    ratios: {dataset name: ratio}; ratios need not sum to 1 (they are normalised) and a ratio
        of 0 drops that dataset (its stream is never opened).
    streams: {dataset name: iterable}, exactly the names of `ratios`.
    seed: seeds the mixer's own generator; each iteration starts again from it.

    When a finite stream runs out the mixer STOPS and records its name in `exhausted`: going
    on with the others would silently change the mix away from the ratios a study asked for.
    Training streams should repeat (be infinite) and bounded by the caller instead.
    `counts` holds how many items each dataset gave in the current (or last) iteration.
    """

    def __init__(self, ratios: Mapping[str, float], streams: Mapping[str, Iterable[T]], *, seed: int = 0) -> None:
        if not ratios:
            raise ValueError("no datasets to mix: ratios is empty")
        for name, ratio in ratios.items():
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise ValueError(f"ratio of {name!r} must be a number, got {ratio!r}")
            if not math.isfinite(ratio) or ratio < 0:
                raise ValueError(f"ratio of {name!r} must be finite and >= 0, got {ratio!r}")
        without_stream = [name for name in ratios if name not in streams]
        if without_stream:
            raise ValueError(
                f"datasets {without_stream} have a ratio but no stream; streams exist for {sorted(streams)}"
            )
        without_ratio = [name for name in streams if name not in ratios]
        if without_ratio:
            raise ValueError(
                f"unknown datasets {without_ratio}: they have a stream but no ratio (ratios are given "
                f"for {sorted(ratios)}); give a ratio of 0 to leave a dataset out"
            )
        total = float(sum(ratios.values()))
        if total <= 0:
            raise ValueError(f"all ratios are 0, nothing to mix: {dict(ratios)}")
        self.weights: dict[str, float] = {name: r / total for name, r in ratios.items() if r > 0}
        self.streams = {name: streams[name] for name in self.weights}
        self.seed = seed
        self.counts: dict[str, int] = {name: 0 for name in self.weights}
        self.exhausted: str | None = None

    def __iter__(self) -> Iterator[tuple[str, T]]:
        rng = random.Random(self.seed)
        names = list(self.weights)
        cumulative = []
        acc = 0.0
        for name in names:
            acc += self.weights[name]
            cumulative.append(acc)
        iterators = {name: iter(self.streams[name]) for name in names}
        self.counts = {name: 0 for name in names}
        self.exhausted = None
        while True:
            # `acc` rather than 1.0: rounding must never leave a draw past the last bucket.
            name = names[min(bisect.bisect_right(cumulative, rng.random() * acc), len(names) - 1)]
            try:
                item = next(iterators[name])
            except StopIteration:
                self.exhausted = name
                return
            self.counts[name] += 1
            yield name, item

    def realised_mix(self) -> dict[str, float]:
        """Fraction of the items so far that came from each dataset (0.0 before any)."""
        total = sum(self.counts.values())
        return {name: (count / total if total else 0.0) for name, count in self.counts.items()}
