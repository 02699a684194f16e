"""Every estimator of a planted study against the truth and against the exhaustive design: one
table, for any planted config.

    python dashboards/estimators.py --reference outputs/studies/planted --sampled outputs/studies/planted-k8 ...
    python dashboards/estimators.py --run --config studies/configs/planted.yaml --subsets 6,10 --sizes 2,3
    python dashboards/estimators.py --recompute --config studies/configs/planted_large.yaml \
        --reference outputs/studies/planted_large --sampled ...

The reference is a study of the exhaustive pair design (singletons and pairs, with the control's
pairs when the config has one); each `--sampled` folder a study of the same config with a
sampled design (`combinations: {sampled: ...}`). Rows, one per estimator:

- exhaustive pairs: the reference's pair rows (its controlled rows with a control);
- sampled (K subsets a seed): the folder's surrogate rows (surrogate_controlled with a control);
- TAG probe: the reference's mean look-ahead affinity, each pair tested against zero with its
  standard error over probes (a z-test, BH over the pairs).

Columns: planted helps and hurts recovered (significant after correction with the planted
sign), those among them above the row's MDE, false positives on `none`, Spearman's rho of the
estimator's per-pair effect against the exhaustive pair influence (mean relative delta over the
target's primary targets), trial-hours and training steps of the trials it used. `--run` trains
the reference and one sampled study per `--subsets` value first (a planted study takes about 15
minutes here). `--recompute` re-reads a reference study written by an earlier version of the
code: its influence table is recomputed from its metrics and runs tables with this version's
statistics, its design and planted truth read from `--config` (the saved config may hold keys
this version no longer reads). Prints the table as Markdown and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
from scipy import stats

from omgseg.dashboards.report import StudyTables
from omgseg.platform.config import SampledCombinations, StudyConfig, load_config
from omgseg.platform.records import StudyState
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.estimates import spearman
from omgseg.platform.study.plan import targets
from omgseg.platform.study.results import influence_table
from omgseg.platform.study.stats import ALPHA, benjamini_hochberg

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EstimatorRow:
    estimator: str
    helps_hurts_recovered: str  # "k/m"
    above_mde_recovered: str  # "k/m" among the planted helps and hurts whose |delta| exceeds the row's MDE
    false_positives_on_none: str  # "k/m"
    spearman_vs_exhaustive: float | None
    trial_hours: float
    training_steps: int


def _per_pair(influence: pl.DataFrame, kind: str) -> pl.DataFrame:
    """The primary rows of `kind`, one per ordered pair: the mean relative delta over the
    target's primary targets, and the row of each target (for the planted check, the first)."""
    rows = influence.filter((pl.col("family") == "primary") & (pl.col("kind") == kind))
    return rows.group_by("source_dataset", "target_dataset").agg(
        pl.col("relative_delta").mean().alias("effect"), pl.col("delta").first(), pl.col("mde").first(),
        pl.col("significant").first(), pl.col("p_value").first()).sort("source_dataset", "target_dataset")


def _check(pairs: dict[tuple[str, str], dict], planted: list) -> tuple[str, str, str]:
    """(helps and hurts recovered, those above their MDE recovered, false positives on none)."""
    effects = [p for p in planted if p.effect != "none"]
    nones = [p for p in planted if p.effect == "none"]

    def agrees(p) -> bool:
        row = pairs.get((p.source, p.target))
        return bool(row and row["significant"] and (row["delta"] > 0) == (p.effect == "helps"))

    above = [p for p in effects if (row := pairs.get((p.source, p.target))) and row["mde"] is not None
             and abs(row["delta"]) > row["mde"]]
    false = [p for p in nones if (row := pairs.get((p.source, p.target))) and row["significant"]]
    return (f"{sum(agrees(p) for p in effects)}/{len(effects)}", f"{sum(agrees(p) for p in above)}/{len(above)}",
            f"{len(false)}/{len(nones)}")


def _rho(effects: dict[tuple[str, str], float], reference: dict[tuple[str, str], float]) -> float | None:
    keys = sorted(set(effects) & set(reference))
    return spearman([effects[k] for k in keys], [reference[k] for k in keys])


def _cost(runs: pl.DataFrame, combos: set) -> tuple[float, int]:
    used = runs.filter(pl.Series([tuple(d) in combos for d in runs["train_datasets"].to_list()], dtype=pl.Boolean))
    return float(used["wall_seconds"].sum()) / 3600, int(used["steps"].sum())


def _design(study: StudyTables) -> StudyDesign:
    return StudyDesign.from_config(study.config)


def _effects(influence: pl.DataFrame, kind: str) -> dict[tuple[str, str], float]:
    return {(r["source_dataset"], r["target_dataset"]): r["effect"] for r in _per_pair(influence, kind).iter_rows(named=True)}


def exhaustive_row(study: StudyTables) -> tuple[EstimatorRow, dict[str, dict]]:
    """The exhaustive design's row, and its per-pair effects by kind (pair, controlled): what
    the other estimators' are compared with."""
    kind = "controlled" if study.config.control else "pair"
    influence = study.tables["influence"]
    per_pair = {(r["source_dataset"], r["target_dataset"]): r for r in _per_pair(influence, kind).iter_rows(named=True)}
    recovered, above, false = _check(per_pair, study.config.planted)
    hours, steps = _cost(study.tables["runs"], set(_design(study).exhaustive().combinations))
    return (EstimatorRow(f"exhaustive pairs ({kind} rows)", recovered, above, false, 1.0, hours, steps),
            {k: _effects(influence, k) for k in ("pair", "controlled")})


def sampled_row(study: StudyTables, reference: dict[str, dict]) -> EstimatorRow:
    """A sampled design's row: its surrogate rows checked against the truth (the controlled ones
    with the control among its subsets), and ranked against the exhaustive rows of the same
    kind (pair for surrogate, controlled for surrogate_controlled)."""
    design = _design(study)
    if not design.sampled:
        raise ValueError(f"{study.folder} is not a study of a sampled design (combinations: {{sampled: ...}})")
    kind = "surrogate_controlled" if "surrogate_controlled" in design.kinds else "surrogate"
    influence = study.tables["influence"]
    per_pair = {(r["source_dataset"], r["target_dataset"]): r for r in _per_pair(influence, kind).iter_rows(named=True)}
    recovered, above, false = _check(per_pair, study.config.planted)
    hours, steps = _cost(study.tables["runs"], set(design.sampled))
    same = "controlled" if kind == "surrogate_controlled" else "pair"
    spec = next(c.sampled for c in study.config.combinations if isinstance(c, SampledCombinations))
    label = f"sampled, {spec.subsets} subsets of {'/'.join(map(str, spec.sizes))} a seed ({kind} rows)"
    return EstimatorRow(label, recovered, above, false,
                        _rho(_effects(influence, kind), reference[same]), hours, steps)


def tag_row(study: StudyTables, reference: dict[str, dict]) -> EstimatorRow:
    """The TAG probe's row: each pair's mean affinity over the probing trials, tested against
    zero with its standard error over probes (z-test, BH over the pairs), ranked against the
    exhaustive pair rows."""
    affinity = study.tables["affinity"].filter(pl.col("source_dataset") != pl.col("target_dataset"))
    pairs = affinity.group_by("source_dataset", "target_dataset").agg(
        pl.col("affinity").mean(), (pl.col("affinity_se") ** 2).mean().sqrt().alias("se"), pl.len().alias("n"))
    pairs = pairs.sort("source_dataset", "target_dataset").to_dicts()
    p_values = [2 * stats.norm.sf(abs(p["affinity"]) / (p["se"] / math.sqrt(p["n"]))) if p["se"] else 1.0 for p in pairs]
    per_pair = {(p["source_dataset"], p["target_dataset"]): {"delta": p["affinity"], "significant": q <= ALPHA, "mde": None}
                for p, q in zip(pairs, benjamini_hochberg(p_values))}
    recovered, _, false = _check(per_pair, study.config.planted)
    runs = study.tables["runs"].filter(pl.col("measures_affinity"))
    return EstimatorRow("TAG probe (one probing trial)", recovered, "–", false,
                        _rho({k: v["delta"] for k, v in per_pair.items()}, reference["pair"]),
                        float(runs["wall_seconds"].sum()) / 3600, int(runs["steps"].sum()))


@dataclass
class Recomputed:
    """A reference study of an earlier version, its influence table recomputed (what the
    estimator rows read of a StudyTables)."""

    folder: Path
    config: StudyConfig
    tables: dict[str, pl.DataFrame]


def recomputed(folder: Path, config: StudyConfig) -> Recomputed:
    """`folder`'s tables with its influence recomputed by this version's statistics from its
    metrics and runs tables, under `config` (which must name the folder's study and train data
    sets). A metrics table without the train_datasets and mixture columns takes them from the
    runs table (a design's trial: no mixture)."""
    saved = StudyState.read(folder).config
    if saved.get("name") != config.name or list(saved.get("train_datasets", [])) != config.train_datasets:
        raise ValueError(f"{folder}: its study ({saved.get('name')}, {saved.get('train_datasets')}) is not the "
                         f"config's ({config.name}, {config.train_datasets})")
    tables = {}
    for name in ("runs", "metrics", "affinity"):
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the study has not written its tables yet")
        tables[name] = pl.read_parquet(path)
    metrics = tables["metrics"]
    if "train_datasets" not in metrics.columns:
        metrics = metrics.join(tables["runs"].select("trial_id", "train_datasets"), on="trial_id", how="left")
    if "mixture" not in metrics.columns:
        metrics = metrics.with_columns(pl.lit(None, dtype=pl.String).alias("mixture"))
    tables["metrics"] = metrics
    tables["influence"] = influence_table(config.name, metrics, StudyDesign.from_config(config), targets(config))
    return Recomputed(Path(folder), config, tables)


def estimator_table(reference: StudyTables, sampled: list[StudyTables]) -> list[EstimatorRow]:
    if not reference.config.planted:
        raise ValueError(f"{reference.folder}: not a planted study (its config has no `planted:`)")
    exhaustive, effects = exhaustive_row(reference)
    return [exhaustive, *(sampled_row(s, effects) for s in sampled), tag_row(reference, effects)]


def markdown(rows: list[EstimatorRow]) -> str:
    lines = ["| estimator | helps and hurts recovered | of those above their MDE | false positives on none "
             "| Spearman vs exhaustive | trial-hours | training steps |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rho = "–" if r.spearman_vs_exhaustive is None else f"{r.spearman_vs_exhaustive:.2f}"
        lines.append(f"| {r.estimator} | {r.helps_hurts_recovered} | {r.above_mde_recovered} | {r.false_positives_on_none} "
                     f"| {rho} | {r.trial_hours:.3f} | {r.training_steps} |")
    return "\n".join(lines)


def _run(config: str, out: Path, overrides: list[str]) -> Path:
    print(f"[estimators] running {config} into {out} {' '.join(overrides)}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--config", config, "--out", str(out),
                           "--resume", *overrides], stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"the study {out} failed (exit {done.returncode}); its logs are in {out / 'logs'}")
    return out


def main(argv: list[str] | None = None, prog: str = "estimators.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="the exhaustive planted study's folder")
    parser.add_argument("--sampled", nargs="*", default=[], help="folders of sampled-design studies of the same config")
    parser.add_argument("--run", action="store_true", help="train the reference and the sampled studies first")
    parser.add_argument("--config", default=str(ROOT / "studies" / "configs" / "planted.yaml"),
                        help="with --run: the config to train; with --recompute: the reference's design and truth")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute the reference's influence table with this version's statistics (an older study)")
    parser.add_argument("--out", default="outputs/estimators", help="with --run: the folder of the studies")
    parser.add_argument("--subsets", default="6,10", help="with --run: K of each sampled study, comma-separated")
    parser.add_argument("--sizes", default="2,3", help="with --run: the sampled subsets' sizes")
    args = parser.parse_args(argv)
    try:
        reference, sampled = args.reference, list(args.sampled)
        if args.run:
            out = Path(args.out)
            reference = str(_run(args.config, out / "exhaustive", []))
            for k in (int(v) for v in args.subsets.split(",")):
                spec = f"combinations={{sampled: {{subsets: {k}, sizes: [{args.sizes}]}}}}"
                sampled.append(str(_run(args.config, out / f"sampled-{k}", [spec, "train.affinity.enabled=false"])))
        if reference is None:
            raise ValueError("give --reference (and --sampled) study folders, or --run")
        study = (recomputed(Path(reference), load_config(StudyConfig, args.config)) if args.recompute
                 else StudyTables(Path(reference)))
        rows = estimator_table(study, [StudyTables(Path(s)) for s in sampled])
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(markdown(rows))
    print(json.dumps({"benchmark": "estimators", "reference": reference, "rows": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
