"""Benchmark: the influence rows' statistics on simulated studies of the default design.

Simulates studies of the default design (7 combinations x 6 seeds, seed offsets; the
simulation is tests/nullstudies.py) with every combination equally noisy, and with the
singletons 1.5 and 2 times noisier than the rest, and measures, for the table's method (the
per-seed contrast, through the real table code) and the alternatives tried before it:

- per_row: the share of null rows with p <= 0.05 (the false-positive rate before correction);
- family_wise: the share of null studies with a row significant after BH, for the worst family;
- power_at_mde: the share of studies that find (p <= 0.05) an effect planted on one pair row
  (vipseg -> coco, object queries: the noisy singleton against a pair) at the size of that
  row's own mean reported MDE;
- power_at_pooled_mde: the same at the pooled model's MDE with equal noise (what the design
  resolved before), to compare the methods' power at one effect.

The alternatives, computed here on the same simulated trials and rows:
- pooled: the seed-blocked model y = mu_c + beta_s + e with one residual variance over every
  combination in the target's scope (statsmodels OLS);
- pooled_unscoped: the same over every combination that reports the target, as before scopes;
- per_combination_variance: the same means, a residual variance per combination (estimated
  from the pooled model's residuals, unbiased under unequal variances), the contrast's
  variance from them, Satterthwaite's degrees of freedom.

Prints one JSON line. Monte-Carlo errors are sqrt(p (1 - p) / studies).

    .venv/bin/python tests/benchmarks/bench_stats.py [--studies N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nullstudies import Simulation, default_design, pair_effect, row_key, singletons_noisier  # noqa: E402

from omgseg.platform.study.results import influence_table, target_cells  # noqa: E402
from omgseg.platform.study.stats import ALPHA, POWER, benjamini_hochberg, minimum_detectable_effect, noncentrality  # noqa: E402

ROW = ("pair", "vipseg", "coco", "object_queries")
METHODS = ("per_seed_contrast", "pooled", "pooled_unscoped", "per_combination_variance")


def _blocked_design(cells: dict) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    combos = sorted({c for c, _ in cells})
    seeds = sorted({s for _, s in cells})
    keys = sorted(cells)
    x = np.zeros((len(keys), len(combos) + len(seeds) - 1))
    groups = np.zeros(len(keys), dtype=int)
    for row, (combo, seed) in enumerate(keys):
        x[row, combos.index(combo)] = 1.0
        groups[row] = combos.index(combo)
        if seeds.index(seed) > 0:
            x[row, len(combos) + seeds.index(seed) - 1] = 1.0
    return combos, x, np.array([cells[k] for k in keys]), groups


def _alternative(cells: dict, with_combo: tuple, without_combo: tuple, method: str) -> tuple[float, float, float] | None:
    """(estimate, p-value, MDE) of with - without under one of the alternative models."""
    combos, x, y, groups = _blocked_design(cells)
    if with_combo not in combos or without_combo not in combos:
        return None
    pinv = np.linalg.pinv(x)
    weights = np.zeros(x.shape[1])
    weights[combos.index(with_combo)], weights[combos.index(without_combo)] = 1.0, -1.0
    a = weights @ pinv  # the contrast as a linear function of the observations
    estimate = float(a @ y)
    residual_maker = np.eye(len(y)) - x @ pinv
    residuals = residual_maker @ y
    df_total = len(y) - np.linalg.matrix_rank(x)
    if method in ("pooled", "pooled_unscoped"):
        variance = float(residuals @ residuals / df_total) * float(a @ a)
        df = float(df_total)
    else:
        k = len(combos)
        expected = np.array([[np.sum(residual_maker[np.ix_(groups == i, groups == j)] ** 2) for j in range(k)]
                             for i in range(k)])
        sums = np.array([np.sum(residuals[groups == i] ** 2) for i in range(k)])
        sigma2 = np.clip(np.linalg.solve(expected, sums), 1e-12, None)
        coefficients = np.array([np.sum(a[groups == i] ** 2) for i in range(k)])
        own_df = np.array([np.trace(residual_maker[np.ix_(groups == i, groups == i)]) for i in range(k)])
        parts = coefficients * sigma2
        variance = float(parts.sum())
        df = float(variance**2 / np.sum(parts**2 / own_df))
    se = math.sqrt(variance)
    p = float(2 * stats.t.sf(abs(estimate) / se, df))
    return -estimate, p, minimum_detectable_effect(se, max(1, round(df)))  # losses: lower is better


def _alternative_rows(simulation: Simulation, metrics: pl.DataFrame, method: str) -> list[dict]:
    rows = []
    for target in simulation.design.targets:
        scoped = replace(target, supervisors=None) if method == "pooled_unscoped" else target
        cells = target_cells(metrics, scoped)
        for comparison in simulation.design.study.comparisons(target.dataset):
            found = _alternative(cells, comparison.with_combo, comparison.without_combo, method)
            if found is not None:
                rows.append({"kind": comparison.kind, "source_dataset": comparison.source, "target_dataset": target.dataset,
                             "task": target.task, "delta": found[0], "p_value": found[1], "mde": found[2]})
    for kind in {r["kind"] for r in rows}:
        family = [r for r in rows if r["kind"] == kind]
        for row, q in zip(family, benjamini_hochberg([r["p_value"] for r in family])):
            row["significant"] = q <= ALPHA
    return rows


def _rows(simulation: Simulation, rng: np.random.Generator, method: str) -> list[dict]:
    metrics = simulation.metrics(rng)
    if method == "per_seed_contrast":
        table = influence_table("sim", metrics, simulation.design.study, simulation.design.targets)
        return [r for r in table.iter_rows(named=True) if r["p_value"] is not None]
    return _alternative_rows(simulation, metrics, method)


def _rate(hits: int, n: int) -> dict:
    p = hits / n
    return {"rate": round(p, 4), "mc_error": round(math.sqrt(p * (1 - p) / n), 4)}


def measure(method: str, ratio: float, studies: int, pooled_mde: float | None) -> dict:
    design = default_design()
    null = Simulation(design, singletons_noisier(ratio))
    rng = np.random.default_rng(0)
    rejected = tested = 0
    family_hits: dict[str, int] = {}
    mdes = []
    for _ in range(studies):
        rows = _rows(null, rng, method)
        rejected += sum(r["p_value"] <= ALPHA for r in rows)
        tested += len(rows)
        for kind in {r["kind"] for r in rows}:
            family_hits[kind] = family_hits.get(kind, 0) + any(r["significant"] for r in rows if r["kind"] == kind)
        mdes += [r["mde"] for r in rows if row_key(r) == ROW]
    mde = float(np.mean(mdes))
    out = {"per_row": _rate(rejected, tested), "family_wise": _rate(max(family_hits.values()), studies),
           "mean_mde": round(mde, 3)}
    for name, size in (("power_at_mde", mde), ("power_at_pooled_mde", pooled_mde)):
        if size is None:
            continue
        _, effect = pair_effect(design, ROW[1], ROW[2], ROW[3], size)
        planted = Simulation(design, singletons_noisier(ratio), [effect])
        rng = np.random.default_rng(1)
        hits = 0
        for _ in range(studies):
            row = next(r for r in _rows(planted, rng, method) if row_key(r) == ROW)
            hits += row["p_value"] <= ALPHA and row["delta"] > 0
        out[name] = _rate(hits, studies)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=2000, help="simulated studies per method and noise pattern")
    args = parser.parse_args()
    started = time.perf_counter()
    # The pooled model's MDE of the row with equal noise (sigma 1): its 80 % power point.
    pooled_mde = noncentrality(15, ALPHA, POWER) * math.sqrt(2 / 6)
    results = {method: {f"singletons_x{ratio}": measure(method, ratio, args.studies, pooled_mde if ratio == 1.0 else None)
                        for ratio in (1.0, 1.5, 2.0)} for method in METHODS}
    print(json.dumps({"benchmark": "bench_stats", "studies": args.studies, "row": "/".join(ROW),
                      "pooled_mde_equal_noise": round(pooled_mde, 3), "methods": results,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
