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
    """K random subsets of the train data sets (and the control), of the given sizes."""

    subsets: int
    sizes: tuple[int, ...]
    seed: int = 0


def balanced_subsets(names: tuple[str, ...], spec: SampledSubsets) -> list[Combination]:
    """`spec.subsets` distinct subsets of `names`, their sizes cycling through `spec.sizes` (a
    size whose subsets are all taken gives way to the next),
    chosen one at a time as a candidate that keeps every data set and every pair of data sets
    as equally represented as possible (the one that adds least to the counts it touches,
    ties broken by a generator seeded with `spec.seed`). Each is in the order of `names`."""
    rng = np.random.default_rng(spec.seed)
    singles: Counter = Counter()
    pairs: Counter = Counter()
    chosen: list[Combination] = []
    for k in range(spec.subsets):
        candidates = []
        for step in range(len(spec.sizes)):  # this subset's size, or the next one with subsets left
            size = spec.sizes[(k + step) % len(spec.sizes)]
            candidates = [c for c in itertools.combinations(names, size) if c not in chosen]
            if candidates:
                break
        if not candidates:
            raise ValueError(f"combinations.sampled: only {len(chosen)} distinct subsets of sizes {list(spec.sizes)} "
                             f"exist among {len(names)} data sets, {spec.subsets} asked for")
        scores = [sum(pairs[p] for p in itertools.combinations(c, 2)) * len(names) + sum(singles[n] for n in c)
                  for c in candidates]
        best = min(scores)
        ties = [c for c, s in zip(candidates, scores) if s == best]
        pick = ties[int(rng.integers(len(ties)))]
        chosen.append(pick)
        singles.update(pick)
        pairs.update(itertools.combinations(pick, 2))
    return chosen


@dataclass(frozen=True)
class StudyDesign:
    """The combinations a study trains and the comparisons they support."""

    train: tuple[str, ...]  # the train data sets, in config order
    combinations: tuple[Combination, ...]  # every combination trained, in plan order, without repeats
    control: str | None = None
    sampled: tuple[Combination, ...] = ()  # the sampled subsets (a sampled design), which the surrogate fits

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
        trained with the control (the controlled rows' baseline)."""
        names = tuple(config.trained())
        base = cls(train=names, combinations=(), control=config.control)
        out: list[Combination] = []
        sampled: list[Combination] = []
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
                found = balanced_subsets(pool, SampledSubsets(spec.subsets, tuple(spec.sizes), spec.seed))
                sampled += [c for c in found if c not in sampled]
            else:
                found = [base.order(item)]
            out += [c for c in found if c not in out]
        if config.control is not None and not sampled:
            out += [c for c in (base.with_control(n) for n in names) if c not in out]
        return cls(train=names, combinations=tuple(out), control=config.control, sampled=tuple(sampled))

    def exhaustive(self) -> StudyDesign:
        """The exhaustive pair design over the same data sets: singletons and pairs, and each
        train data set with the control; what a sampled design's cost is set against."""
        combos = [(n,) for n in self.train] + list(itertools.combinations(self.train, 2))
        if self.control:
            combos += [self.with_control(n) for n in self.train]
        return StudyDesign(train=self.train, combinations=tuple(combos), control=self.control)
