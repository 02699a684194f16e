"""Simulated studies of the default design with a known truth, run through the real table code
(omgseg.platform.study.results): the false-positive rates and the power of the influence
rows' statistics. tests/platform/study/test_stats.py runs a small version,
tests/benchmarks/bench_stats.py the full one.

A simulated study is the default config's plan (3 train data sets, 7 combinations, its seeds)
and its primary targets (the validation losses, ADE20K's evaluated only). Every trial reports
every target, as a real study does; a target's value in a trial of its scope is

    y[c, s] = 5 + offset[s] + noise[c] * e[c, s] - effect[c],   e ~ N(0, 1), offset[s] ~ N(0, 1)

(a loss: lower is better, so a planted effect lowers it), and outside its scope a value
that never trained (around 17, spread 4), which the tables must leave out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from omgseg.platform.config import StudyConfig, load_config
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.plan import Target, targets
from omgseg.platform.study.results import METRICS_SCHEMA, influence_table

DEFAULT = Path(__file__).resolve().parents[1] / "studies" / "configs" / "default.yaml"


@dataclass(frozen=True)
class Design:
    config: StudyConfig
    study: StudyDesign
    targets: list[Target]
    seeds: list[int]

    @property
    def combinations(self) -> tuple[tuple[str, ...], ...]:
        return self.study.combinations


def default_design() -> Design:
    config = load_config(StudyConfig, DEFAULT)
    return Design(config, StudyDesign.from_config(config), [t for t in targets(config) if t.primary], list(config.seeds))


def singletons_noisier(ratio: float) -> Callable[[tuple[str, ...]], float]:
    """A noise SD per combination: `ratio` for a singleton, 1 for the others."""
    return lambda combo: ratio if len(combo) == 1 else 1.0


@dataclass(frozen=True)
class Effect:
    """A planted effect: training `combination` lowers `target`'s loss by `size` (helps)."""

    target: Target
    combination: tuple[str, ...]
    size: float


@dataclass
class Simulation:
    design: Design
    noise: Callable[[tuple[str, ...]], float]
    effects: list[Effect] = field(default_factory=list)

    def metrics(self, rng: np.random.Generator) -> pl.DataFrame:
        offsets = {s: rng.normal() for s in self.design.seeds}
        shift = {(e.target, e.combination): e.size for e in self.effects}
        rows = []
        for combo in self.design.combinations:
            name = "+".join(combo)
            for seed in self.design.seeds:
                for target in self.design.targets:
                    if target.in_scope(combo):
                        value = 5.0 + offsets[seed] + self.noise(combo) * rng.normal() - shift.get((target, combo), 0.0)
                    else:
                        value = 17.0 + 4.0 * rng.normal()
                    rows.append({"study": "sim", "trial_id": f"{name}-s{seed}", "combination": name, "mixture": None,
                                 "train_datasets": list(combo), "seed": seed, "eval_dataset": target.dataset,
                                 "task": target.task, "metric": target.metric, "value": value})
        return pl.DataFrame(rows, schema=METRICS_SCHEMA)

    def influence(self, rng: np.random.Generator) -> pl.DataFrame:
        return influence_table("sim", self.metrics(rng), self.design.study, self.design.targets)


def row_key(row: dict) -> tuple[str, str, str, str]:
    return row["kind"], row["source_dataset"], row["target_dataset"], row["task"]


@dataclass(frozen=True)
class Rates:
    studies: int
    per_row: float  # the share of null rows with p <= 0.05
    family_wise: float  # the largest, over families (family, kind), share of studies with a row significant after BH
    mde: dict  # row key -> mean reported MDE

    def monte_carlo_error(self, rate: float) -> float:
        return float(np.sqrt(rate * (1 - rate) / self.studies))


def null_rates(simulation: Simulation, studies: int, seed: int = 0) -> Rates:
    """Per-row and family-wise false-positive rates of `studies` null studies."""
    rng = np.random.default_rng(seed)
    rejected = tested = 0
    any_by_family: dict[tuple[str, str], int] = {}
    mde: dict[tuple, list[float]] = {}
    for _ in range(studies):
        influence = simulation.influence(rng).filter(pl.col("p_value").is_not_null())
        rejected += int((influence["p_value"] <= 0.05).sum())
        tested += influence.height
        for (family, kind), rows in influence.group_by("family", "kind"):
            any_by_family[(family, kind)] = any_by_family.get((family, kind), 0) + int(rows["significant"].any())
        for row in influence.iter_rows(named=True):
            mde.setdefault(row_key(row), []).append(row["mde"])
    return Rates(studies=studies, per_row=rejected / tested,
                 family_wise=max(any_by_family.values()) / studies,
                 mde={k: float(np.mean(v)) for k, v in mde.items()})


def power(simulation: Simulation, key: tuple[str, str, str, str], studies: int, seed: int = 1) -> float:
    """The share of `studies` studies whose row `key` has p <= 0.05 (before correction)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(studies):
        influence = simulation.influence(rng)
        row = next(r for r in influence.iter_rows(named=True) if row_key(r) == key)
        hits += row["p_value"] is not None and row["p_value"] <= 0.05 and row["delta"] > 0
    return hits / studies


def pair_effect(design: Design, source: str, target_dataset: str, task: str, size: float) -> tuple[tuple, Effect]:
    """The pair row source -> target and the effect that plants `size` on it."""
    target = next(t for t in design.targets if t.dataset == target_dataset and t.task == task)
    combo = tuple(n for n in design.config.trained() if n in (source, target_dataset))
    return ("pair", source, target_dataset, task), Effect(target, combo, size)
