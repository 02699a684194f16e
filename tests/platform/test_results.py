"""The result tables from hand-made trial records: influence, confidence intervals, correlation
and the cheap-versus-exhaustive comparison, each against a hand computation or scipy."""

import math

import polars as pl
import pytest
from scipy import stats

from omgseg.platform.results import SCHEMAS, TrialRecord, build_tables, compare_estimates, write_tables

TARGETS = [("a", "panoptic", "PQ"), ("b", "vos", "J&F"), ("z", "panoptic", "PQ")]  # z: evaluated only


def _record(datasets, seed, a_pq, b_jf, z_pq, affinity=None, status="finished"):
    combo = "+".join(datasets)
    return TrialRecord(
        trial_id=f"{combo}-s{seed}", combination=combo, datasets=list(datasets), ratios=[1 / len(datasets)] * len(datasets),
        seed=seed, steps=10, status=status, mlflow_run_id=f"run-{combo}-{seed}", measures_affinity=affinity is not None,
        wall_seconds=3600.0 if len(datasets) == 1 else 7200.0, seconds={"train": 1.0, "fit": 2.0},
        metrics={} if status != "finished" else {"a": {"panoptic": {"PQ": a_pq, "N": 3, "per_class": {"1": {}}}},
                                                  "b": {"vos": {"J&F": b_jf}}, "z": {"panoptic": {"PQ": z_pq}}},
        affinity=affinity or {},
    )


RECORDS = [
    _record(["a"], 0, 10.0, 0.0, 1.0), _record(["a"], 1, 12.0, 0.0, 2.0),
    _record(["b"], 0, 0.0, 40.0, 3.0), _record(["b"], 1, 0.0, 44.0, 5.0),
    _record(["a", "b"], 0, 13.0, 38.0, 4.0, affinity={"a": {"a": 0.3, "b": -0.1}, "b": {"a": 0.2, "b": 0.4}}),
    _record(["a", "b"], 1, 17.0, 42.0, 6.0, affinity={"a": {"a": 0.1, "b": -0.3}, "b": {"a": 0.0, "b": 0.2}}),
    _record(["a", "b"], 2, 0, 0, 0, status="failed"),
]


@pytest.fixture(scope="module")
def tables():
    return build_tables("s", RECORDS, ["a", "b"], TARGETS)


def test_schemas_and_row_counts(tables):
    for name, frame in tables.items():
        assert dict(frame.schema) == SCHEMAS[name], name
    assert tables["runs"].height == 7 and tables["runs"].filter(pl.col("status") == "failed").height == 1
    # 6 finished trials x 3 scalar metrics (PQ, N on a; J&F on b; PQ on z): 4 rows each.
    assert tables["metrics"].height == 6 * 4
    # pair: b on a, a on b; leave-one-out: b on a, a on b, a on z, b on z.
    assert tables["influence"].height == 6
    assert tables["correlation"].height == 9 and tables["affinity"].height == 8


def test_pair_influence_by_hand(tables):
    row = tables["influence"].filter((pl.col("kind") == "pair") & (pl.col("target_dataset") == "a")).row(0, named=True)
    # a alone: 10, 12; a with b: 13, 17 -> deltas 3, 5: mean 4, sd sqrt(2), t(0.975, 1) = 12.7062.
    assert row["source_dataset"] == "b" and row["n_seeds"] == 2
    assert row["delta"] == pytest.approx(4.0) and row["relative_delta"] == pytest.approx(4.0 / 11.0)
    half = 12.706204736 * math.sqrt(2) / math.sqrt(2)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((4.0 - half, 4.0 + half))
    hurt = tables["influence"].filter((pl.col("kind") == "pair") & (pl.col("target_dataset") == "b")).row(0, named=True)
    assert hurt["delta"] == pytest.approx(-2.0)
    assert hurt["with_source"] == pytest.approx(40.0) and hurt["without_source"] == pytest.approx(42.0)
    assert hurt["ci_low"] == pytest.approx(hurt["ci_high"])  # both deltas are -2: no spread


def test_leave_one_out_reaches_evaluation_only_targets(tables):
    z = tables["influence"].filter((pl.col("kind") == "leave_one_out") & (pl.col("target_dataset") == "z"))
    by_source = {r["source_dataset"]: r for r in z.iter_rows(named=True)}
    # all = a+b: 4, 6. Without a = b alone: 3, 5 -> +1; without b = a alone: 1, 2 -> +3.5.
    assert by_source["a"]["delta"] == pytest.approx(1.0) and by_source["b"]["delta"] == pytest.approx(3.5)


def test_correlation_against_scipy(tables):
    row = tables["correlation"].filter((pl.col("dataset_a") == "a") & (pl.col("dataset_b") == "z")).row(0, named=True)
    a = [10.0, 12.0, 0.0, 0.0, 13.0, 17.0]
    z = [1.0, 2.0, 3.0, 5.0, 4.0, 6.0]
    assert row["n_trials"] == 6
    assert row["pearson"] == pytest.approx(stats.pearsonr(a, z).statistic)
    assert row["spearman"] == pytest.approx(stats.spearmanr(a, z).statistic)
    diagonal = tables["correlation"].filter((pl.col("dataset_a") == "b") & (pl.col("dataset_b") == "b")).row(0, named=True)
    assert diagonal["pearson"] == pytest.approx(1.0)


def test_cheap_against_exhaustive(tables):
    out = compare_estimates(tables["influence"], tables["affinity"], tables["runs"])
    assert out["n_pairs"] == 2 and out["spearman"] is None  # 2 pairs are too few for a rank correlation
    pairs = {(p["source_dataset"], p["target_dataset"]): p for p in out["pairs"]}
    assert pairs[("a", "b")]["affinity"] == pytest.approx(-0.2) and pairs[("b", "a")]["affinity"] == pytest.approx(0.1)
    assert pairs[("b", "a")]["influence"] == pytest.approx(4.0 / 11.0)
    # Singletons (4 x 1 h) and pairs (2 x 2 h) are the exhaustive cost; the affinity trials 2 x 2 h.
    assert out["exhaustive_trial_hours"] == pytest.approx(8.0) and out["affinity_trial_hours"] == pytest.approx(4.0)


def test_written_tables_read_back_equal(tables, tmp_path):
    paths = write_tables(tables, tmp_path)
    for name, path in paths.items():
        assert pl.read_parquet(path).equals(tables[name])
    assert not list(tmp_path.glob("*.partial"))


def test_record_json_round_trip():
    assert TrialRecord.from_json(RECORDS[4].to_json()) == RECORDS[4]
