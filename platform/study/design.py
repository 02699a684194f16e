"""A study's design: the combinations of data sets it trains and the comparisons it reports.

Every part of a study that asks "which combinations?" or "what is compared with what?" asks
this object: the planner (which trials to run), the influence table (which rows, from which
two combinations), the cheap-versus-exhaustive comparison and the planted check (which pair
each ordered pair of data sets is measured by), the surrogate (which subsets it fits) and the
report. A combination is a tuple of data set names in the study's order (the train data sets
in config order, the control last), never a joined name: `StudyDesign.name` makes the
"coco+vipseg" of trial ids and tables for people to read, and nothing parses it back.

Comparisons, each a row kind of the influence table:
- pair: {source, target} against {target};
- controlled (a study with a control C): {source, target} against {target, C};
- leave_one_out: every train data set against all but the source;
- surrogate (a sampled design): the source's coefficient in the target's surrogate, a model
  fitted over the sampled subsets (omgseg.platform.study.surrogate); with a control in the
  subsets, surrogate_controlled: the source's coefficient minus the control's.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from omgseg.platform.config import SampledCombinations, StudyConfig

Combination = tuple[str, ...]
KINDS = ("pair", "controlled", "leave_one_out", "surrogate", "surrogate_controlled")


@dataclass(frozen=True)
class Comparison:
    """One influence row's definition: what adding `source` does to `target`'s targets,
    measured as `with_combo` against `without_combo` (for surrogate rows: the model's
    prediction for them)."""

    kind: str
    source: str
    target: str
    with_combo: Combination
    without_combo: Combination


@dataclass(frozen=True)
class SampledSubsets:
    """K random subsets of the train data sets (and the control) at each seed, of the given sizes."""

    subsets: int  # at each seed
    sizes: tuple[int, ...]
    seeds: tuple[int, ...]  # the study's seeds
    seed: int = 0  # of the draw


def balanced_subsets(names: tuple[str, ...], spec: SampledSubsets) -> list[tuple[int, Combination]]:
    """`spec.subsets` distinct subsets of `names` at each of `spec.seeds`, as (seed, subset), their
    sizes cycling through `spec.sizes` over the whole draw (a size whose subsets are all taken
    at that seed gives way to the next). Chosen one at a time as a candidate that keeps every
    data set and every pair of data sets as equally represented as possible over all seeds and,
    among those, one drawn at the fewest earlier seeds, so that the seeds see different subsets
    (what lets the surrogate, fitted over all seeds, separate more sources than one seed's
    subsets can); ties broken by a generator seeded with `spec.seed`. Each subset is in the
    order of `names`."""
    rng = np.random.default_rng(spec.seed)
    singles: Counter = Counter()
    pairs: Counter = Counter()
    drawn: Counter = Counter()
    chosen: list[tuple[int, Combination]] = []
    for block, seed in enumerate(spec.seeds):
        here: list[Combination] = []
        for k in range(spec.subsets):
            candidates = []
            for step in range(len(spec.sizes)):  # this subset's size, or the next one with subsets left
                size = spec.sizes[(block * spec.subsets + k + step) % len(spec.sizes)]
                candidates = [c for c in itertools.combinations(names, size) if c not in here]
                if candidates:
                    break
            if not candidates:
                raise ValueError(f"combinations.sampled: only {len(here)} distinct subsets of sizes {list(spec.sizes)} "
                                 f"exist among {len(names)} data sets, {spec.subsets} asked for at each seed")
            balance = [sum(pairs[p] for p in itertools.combinations(c, 2)) * len(names) + sum(singles[n] for n in c)
                       for c in candidates]
            scores = [(b, drawn[c]) for b, c in zip(balance, candidates)]
            best = min(scores)
            ties = [c for c, s in zip(candidates, scores) if s == best]
            pick = ties[int(rng.integers(len(ties)))]
            here.append(pick)
            singles.update(pick)
            pairs.update(itertools.combinations(pick, 2))
        drawn.update(here)
        chosen += [(seed, c) for c in here]
    return chosen


@dataclass(frozen=True)
class StudyDesign:
    """The combinations a study trains and the comparisons they support."""

    train: tuple[str, ...]  # the train data sets, in config order
    combinations: tuple[Combination, ...]  # every combination trained, in plan order, without repeats
    control: str | None = None
    draws: tuple[tuple[int, Combination], ...] = ()  # a sampled design's (seed, subset) trials, which the surrogate fits

    @cached_property
    def sampled(self) -> tuple[Combination, ...]:
        """The subsets a sampled design drew at any seed, in draw order, without repeats (kept:
        every cell of a study's tables is checked against it)."""
        return tuple(dict.fromkeys(c for _, c in self.draws))

    def seeds_of(self, combination: Combination, seeds) -> list[int]:
        """The seeds `combination` is trained at: a sampled subset at the seeds it was drawn at,
        anything else at every seed."""
        if combination not in self.sampled:
            return list(seeds)
        drawn = {s for s, c in self.draws if c == combination}
        return [s for s in seeds if s in drawn]

    @staticmethod
    def name(combination: Combination) -> str:
        """The combination as people read it in trial ids and tables: "coco+vipseg"."""
        return "+".join(combination)

    def order(self, datasets) -> Combination:
        """`datasets` in the study's order: the train data sets in config order, the control last."""
        wanted = set(datasets)
        unknown = wanted - set(self.train) - {self.control}
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not data sets of this study ({list(self.train)})")
        return tuple(n for n in (*self.train, self.control) if n in wanted)

    def alone(self, target: str) -> Combination:
        return (target,)

    def pair(self, source: str, target: str) -> Combination:
        return self.order((source, target))

    def with_control(self, target: str) -> Combination:
        """{target, control}: the controlled rows' baseline."""
        return self.order((target, self.control))

    @property
    def everything(self) -> Combination:
        return self.train

    def trains(self, combination: Combination) -> bool:
        return combination in self.combinations

    @property
    def kinds(self) -> tuple[str, ...]:
        """The row kinds this design reports, in the table's order."""
        out = []
        if any(self.trains((t,)) and self.trains(self.pair(s, t)) for s in self.train for t in self.train if s != t):
            out.append("pair")
        if self.control and any(self.trains(self.with_control(t)) for t in self.train):
            out.append("controlled")
        if len(self.train) > 1 and self.trains(self.everything):
            out.append("leave_one_out")
        if self.sampled:
            out += ["surrogate"] + (["surrogate_controlled"] if self.control and any(self.control in c for c in self.sampled)
                                    else [])
        return tuple(k for k in KINDS if k in out)

    @property
    def checked_kind(self) -> str:
        """The row kind a planted study's truth is checked against: the surrogate's for a sampled
        design, the controlled rows with a control (against the control what any added data set
        does cancels), else the pair rows."""
        for kind in ("surrogate_controlled", "surrogate", "controlled"):
            if kind in self.kinds:
                return kind
        return "pair"

    def comparisons(self, target: str) -> list[Comparison]:
        """Every comparison of two trained combinations this design gives `target` (a train data
        set, or an evaluation-only one, which has leave-one-out rows only); the surrogate rows
        are the surrogate's (omgseg.platform.study.surrogate)."""
        out = []
        for source in self.train:
            if source == target:
                continue
            if target in self.train:
                pair = self.pair(source, target)
                if self.trains(pair) and self.trains(self.alone(target)):
                    out.append(Comparison("pair", source, target, pair, self.alone(target)))
                if self.control and self.trains(pair) and self.trains(self.with_control(target)):
                    out.append(Comparison("controlled", source, target, pair, self.with_control(target)))
            rest = tuple(n for n in self.train if n != source)
            if len(self.train) > 1 and self.trains(self.everything) and self.trains(rest):
                out.append(Comparison("leave_one_out", source, target, self.everything, rest))
        return out

    def pair_comparison(self, source: str, target: str, controlled: bool = False) -> Comparison | None:
        """The comparison that measures source -> target between two train data sets: the pair
        row (or the controlled one), when the design trains both its combinations."""
        kind = "controlled" if controlled else "pair"
        return next((c for c in self.comparisons(target) if c.kind == kind and c.source == source), None)

    @classmethod
    def from_config(cls, config: StudyConfig) -> StudyDesign:
        """The combinations of `config.combinations`, in its order, without repeats: singletons,
        pairs, leave_one_out, all, explicit lists, and sampled subsets (of the train data sets
        and the control). With a control and no sampled subsets, each train data set is also
        trained with the control (the controlled rows' baseline). A sampled subset that another
        item also names is trained, and fitted, at every seed."""
        names = tuple(config.trained())
        base = cls(train=names, combinations=(), control=config.control)
        out: list[Combination] = []
        draws: list[tuple[int, Combination]] = []
        every_seed: list[Combination] = []
        for item in config.combinations:
            if item == "singletons":
                found = [(n,) for n in names]
            elif item == "pairs":
                found = list(itertools.combinations(names, 2))
            elif item == "leave_one_out":
                found = [tuple(n for n in names if n != left) for left in names] if len(names) > 1 else []
            elif item == "all":
                found = [names]
            elif isinstance(item, SampledCombinations):
                spec = item.sampled
                pool = names + ((config.control,) if config.control else ())
                drawn = balanced_subsets(pool, SampledSubsets(spec.subsets, tuple(spec.sizes), tuple(config.seeds),
                                                              spec.seed))
                draws += [d for d in drawn if d not in draws]
                found = list(dict.fromkeys(c for _, c in drawn))
            else:
                found = [base.order(item)]
            if not isinstance(item, SampledCombinations):
                every_seed += found
            out += [c for c in found if c not in out]
        if config.control is not None and not draws:
            out += [c for c in (base.with_control(n) for n in names) if c not in out]
        sampled = {c for _, c in draws}
        draws += [(seed, c) for c in dict.fromkeys(every_seed) if c in sampled for seed in config.seeds
                  if (seed, c) not in draws]
        return cls(train=names, combinations=tuple(out), control=config.control, draws=tuple(draws))

    def exhaustive(self) -> StudyDesign:
        """The exhaustive pair design over the same data sets: singletons and pairs, and each
        train data set with the control; what a sampled design's cost is set against."""
        combos = [(n,) for n in self.train] + list(itertools.combinations(self.train, 2))
        if self.control:
            combos += [self.with_control(n) for n in self.train]
        return StudyDesign(train=self.train, combinations=tuple(combos), control=self.control)
