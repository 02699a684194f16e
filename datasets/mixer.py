"""Interleaving per-dataset streams at given ratios, with exact exposure.

A study compares runs that mix different data sets, so how many samples each data set
contributes must not be left to chance: with independent random draws, a run of 300 draws
at 1:1 gives one data set anywhere from 130 to 170 samples. Here the order is a shuffled
round-robin instead. Draws come in blocks of k (k = the number of data sets); each block
takes, for each of its k slots, the data set furthest behind its share (its ratio times the
draws so far), and the block is then shuffled. At equal ratios every block holds each data
set once; at any ratios, after n draws every data set has within one sample of its share.

Written by hand rather than with webdataset's `RandomMix`, which draws independently (and
from the global `random` module, so any other user of it changes the mix).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from omgseg.core.seeds import derive_seed

T = TypeVar("T")


def interleave_schedule(weights: Mapping[str, float], seed: int, *, block: int = 0,
                        counts: Mapping[str, int] | None = None) -> Iterator[str]:
    """The data set of every draw, without end: blocks of len(weights) slots, each slot to the
    data set with the largest deficit `(draws + 1) * weight - count` (ties: first in order),
    each block then shuffled by its own generator, derived from (seed, block).

    block, counts: start at that block, the data sets having given `counts` draws before it (as
    a full run's schedule does when it gets there: see `Mixer.block_counts`)."""
    names = list(weights)
    counts = {n: int((counts or {}).get(n, 0)) for n in names}
    drawn = sum(counts.values())
    if drawn != block * len(names):
        raise ValueError(f"{drawn} draws before block {block} of {len(names)} slots: the counts {counts} do not "
                         f"belong to that block's start")
    for index in range(block, 1 << 62):
        picks = []
        for _ in names:
            drawn += 1
            name = max(names, key=lambda n: (drawn * weights[n] - counts[n], -names.index(n)))
            counts[name] += 1
            picks.append(name)
        random.Random(derive_seed(seed, "interleave", index)).shuffle(picks)
        yield from picks


class Mixer(Generic[T]):
    """Yields `(dataset_name, item)` pairs, the data sets interleaved by `interleave_schedule`.

    ratios: {dataset name: ratio}; ratios need not sum to 1 (they are normalised) and a ratio
        of 0 drops that dataset (its stream is never opened).
    streams: {dataset name: iterable}, exactly the names of `ratios`.
    seed: fixes the order within blocks; each iteration starts again from it.
    start: draws of the schedule to pass over first (a resumed run: its streams must have
        been advanced past the items those draws took, see `counts_after`).
    block_counts: the items each data set gave before the block the `start`-th draw is in (what
        `block_counts` was then): the schedule starts at that block instead of replaying every
        draw before it, so a resume costs the same late in a run as early.

    When a finite stream runs out the mixer STOPS and records its name in `exhausted`: going
    on with the others would silently change the mix away from the ratios a study asked for.
    Training streams should repeat (be infinite) and bounded by the caller instead.
    `counts` holds how many items each dataset gave in the current (or last) iteration;
    `block_counts` how many each gave, counting the `start` draws, before the block of the next
    draw (what a resumed Mixer takes as its `block_counts`).
    """

    def __init__(self, ratios: Mapping[str, float], streams: Mapping[str, Iterable[T]], *, seed: int = 0,
                 start: int = 0, block_counts: Mapping[str, int] | None = None) -> None:
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
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.weights: dict[str, float] = {name: r / total for name, r in ratios.items() if r > 0}
        self.streams = {name: streams[name] for name in self.weights}
        self.seed = seed
        self.start = start
        self.counts: dict[str, int] = dict.fromkeys(self.weights, 0)
        self.start_block = {n: int(c) for n, c in block_counts.items() if n in self.weights} if block_counts else None
        self.block_counts: dict[str, int] = dict(self.start_block or dict.fromkeys(self.weights, 0))
        self.exhausted: str | None = None

    def _schedule(self) -> tuple[Iterator[str], dict[str, int], int]:
        """The schedule from the block of the `start`-th draw when its counts are known (else
        from the first block), those counts, and the draws before that block."""
        if self.start_block is None:
            return interleave_schedule(self.weights, self.seed), dict.fromkeys(self.weights, 0), 0
        block = self.start // len(self.weights)
        return (interleave_schedule(self.weights, self.seed, block=block, counts=self.start_block),
                dict(self.start_block), block * len(self.weights))

    def counts_after(self, draws: int) -> dict[str, int]:
        """How many items each data set gives in the schedule's first `draws` draws (with
        `block_counts`, `draws` must be in `start`'s block or after)."""
        schedule, counts, before = self._schedule()
        if draws < before:
            raise ValueError(f"the schedule starts at draw {before}, after draw {draws}")
        for _ in range(draws - before):
            counts[next(schedule)] += 1
        return counts

    def __iter__(self) -> Iterator[tuple[str, T]]:
        schedule, totals, drawn = self._schedule()
        k = len(self.weights)
        self.block_counts = dict(totals)
        for _ in range(self.start - drawn):
            totals[next(schedule)] += 1
            drawn += 1
            if drawn % k == 0:
                self.block_counts = dict(totals)
        iterators = {name: iter(self.streams[name]) for name in self.weights}
        self.counts = dict.fromkeys(self.weights, 0)
        self.exhausted = None
        for name in schedule:
            try:
                item = next(iterators[name])
            except StopIteration:
                self.exhausted = name
                return
            self.counts[name] += 1
            totals[name] += 1
            drawn += 1
            if drawn % k == 0:
                self.block_counts = dict(totals)
            yield name, item

    def realised_mix(self) -> dict[str, float]:
        """The share of each dataset among the items drawn so far (or in the last iteration)."""
        total = sum(self.counts.values())
        return {name: (count / total if total else 0.0) for name, count in self.counts.items()}
