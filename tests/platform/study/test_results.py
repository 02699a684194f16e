"""The result tables from hand-made trial records: signed influence, the rows' intervals
against scipy's paired t-test, each row on its own combinations, BH q-values and adjusted
MDEs, floor flags, the A/A check, targets' scopes, correlation, and the cheap-versus-exhaustive
comparison."""


import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from omgseg.platform.records import DatasetEvaluation, Estimates, Evaluation, StudySummary, TrialRecord
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.estimates import compare_estimates, pair_influence, partitions, planted_check
from omgseg.platform.study.plan import Target
from omgseg.platform.study.results import (
    SCHEMAS,
    build_tables,
    correlation_table,
    influence_table,
    null_check,
    runs_table,
    write_tables,
)
from omgseg.platform.study.stats import adjusted_alpha, minimum_detectable_effect

A_LOSS = Target("a", "object_queries", "val_loss", "lower", True)
B_LOSS = Target("b", "prompt_queries", "val_loss", "lower", True)
Z_LOSS = Target("z", "object_queries", "val_loss", "lower", True)  # z: evaluated only
A_PQ = Target("a", "panoptic", "PQ", "higher", False)
TARGETS = [A_LOSS, B_LOSS, Z_LOSS, A_PQ]
SEEDS = [0, 1, 2, 3]

# Validation losses per (combination, seed): a is helped by b (its loss drops by ~1), b is
# hurt by a (its loss rises by ~0.5); each seed adds its own offset to every combination.
OFFSET = {0: 0.0, 1: 0.7, 2: -0.4, 3: 0.2}
_rng = np.random.default_rng(5)
NOISE = {(c, s): float(_rng.normal(0, 0.06)) for c in ("a", "b", "a+b") for s in SEEDS}


def _a_loss(combo, seed):
    return (10.0 if combo == "a" else 9.0) + OFFSET[seed] + NOISE[(combo, seed)]


def _b_loss(combo, seed):
    return (5.0 if combo == "b" else 5.5) + OFFSET[seed] + NOISE[(combo, seed)] * 2


def _z_loss(combo, seed):
    return {"a": 8.0, "b": 8.5, "a+b": 7.6}[combo] + OFFSET[seed] - NOISE[(combo, seed)]


def _record(datasets, seed, affinity=None, status="finished"):
    combo = "+".join(datasets)
    if status != "finished":
        return TrialRecord(trial_id=f"{combo}-s{seed}", combination=combo, datasets=list(datasets),
                           ratios=[1 / len(datasets)] * len(datasets), seed=seed, steps=10 * len(datasets),
                           status=status, error="killed")
    metrics = {"z": DatasetEvaluation(losses={"object_queries": _z_loss(combo, seed)})}
    if "a" in datasets:
        metrics["a"] = DatasetEvaluation({"panoptic": {"PQ": 0.0 if combo == "a" else 3.0 + seed, "N": 3,
                                                       "per_class": {"1": {}}}}, {"object_queries": _a_loss(combo, seed)})
    if "b" in datasets:
        metrics["b"] = DatasetEvaluation(losses={"prompt_queries": _b_loss(combo, seed)})
    return TrialRecord(
        trial_id=f"{combo}-s{seed}", combination=combo, datasets=list(datasets), ratios=[1 / len(datasets)] * len(datasets),
        seed=seed, steps=10 * len(datasets), status=status, mlflow_run_id=f"run-{combo}-{seed}",
        measures_affinity=affinity is not None, wall_seconds=3600.0 if len(datasets) == 1 else 7200.0,
        seconds={"train": 1.0, "fit": 2.0}, samples={n: 20 for n in datasets},
        metrics=Evaluation(metrics), affinity=affinity or {},
    )


RECORDS = [_record(d, s, affinity={"a": {"a": 3.0, "b": -2.0}, "b": {"a": 1.0, "b": 2.0}} if d == ("a", "b") and s == 0
                   else None) for d in (("a",), ("b",), ("a", "b")) for s in SEEDS]
RECORDS.append(_record(("a", "b"), 9, status="failed"))
DESIGN = StudyDesign(train=("a", "b"), combinations=(("a",), ("b",), ("a", "b")))


@pytest.fixture(scope="module")
def tables():
    return build_tables("s", RECORDS, DESIGN, TARGETS)


def _row(tables, kind, source, target, metric="val_loss"):
    frame = tables["influence"].filter((pl.col("kind") == kind) & (pl.col("source_dataset") == source)
                                       & (pl.col("target_dataset") == target) & (pl.col("metric") == metric))
    return frame.row(0, named=True)


def test_schemas_and_row_counts(tables):
    for name, frame in tables.items():
        assert dict(frame.schema) == SCHEMAS[name], name
    runs = tables["runs"]
    assert runs.height == 13 and runs.filter(pl.col("status") == "failed").height == 1
    assert runs.filter(pl.col("trial_id") == "a+b-s0")["samples_per_dataset"].to_list() == [[20, 20]]
    # pair: b on a (loss, PQ), a on b; leave-one-out: the same three, plus a and b on z.
    assert tables["influence"].height == 8
    assert tables["affinity"].height == 4


def test_two_combinations_reduce_to_the_paired_t_test(tables):
    """A pair row is the paired t-test of its two combinations."""
    row = _row(tables, "pair", "b", "a")
    with_b = [_a_loss("a+b", s) for s in SEEDS]
    alone = [_a_loss("a", s) for s in SEEDS]
    diffs = np.subtract(alone, with_b)  # lower is better: positive = b helps a
    assert row["direction"] == "lower" and row["family"] == "primary"
    assert row["delta"] == pytest.approx(diffs.mean()) and row["delta"] > 0
    assert row["df"] == 3 and row["se"] == pytest.approx(diffs.std(ddof=1) / 2)
    assert row["p_value"] == pytest.approx(stats.ttest_rel(alone, with_b).pvalue)
    half = stats.t.ppf(0.975, 3) * row["se"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((row["delta"] - half, row["delta"] + half))
    assert row["mde"] == pytest.approx(minimum_detectable_effect(row["se"], 3))
    hurt = _row(tables, "pair", "a", "b")
    assert hurt["delta"] == pytest.approx(-0.5, abs=0.1) and hurt["ci_high"] < 0


def test_a_row_uses_its_own_two_combinations_only(tables):
    """z is in all three combinations; its leave-one-out row of a is {a, b} against {b}, seed
    by seed, whatever the third combination does: nothing is pooled."""
    y = {c: np.array([_z_loss(c, s) for s in SEEDS]) for c in ("a", "b", "a+b")}
    row = _row(tables, "leave_one_out", "a", "z")  # all (a+b) against without a (b alone)
    diffs = y["b"] - y["a+b"]  # lower is better: positive = a helps z
    assert row["df"] == 3 and row["se"] == pytest.approx(diffs.std(ddof=1) / 2)
    assert row["delta"] == pytest.approx(diffs.mean()) and row["delta"] == pytest.approx(0.9, abs=0.2)
    assert row["with_datasets"] == ["a", "b"] and row["without_datasets"] == ["b"]
    assert row["seeds"] == SEEDS and row["seed_deltas"] == pytest.approx(list(diffs))
    assert row["pairing_ratio"] == pytest.approx(np.var(diffs, ddof=1) / (np.var(y["a+b"], ddof=1) + np.var(y["b"], ddof=1)))
    assert row["pairing_ratio"] < 0.1  # the seed offsets cancel in the paired difference
    noisy = tables["metrics"].with_columns(  # z's {a} trials made ten times noisier
        pl.when((pl.col("combination") == "a") & (pl.col("eval_dataset") == "z"))
        .then(pl.col("value") + pl.Series(np.random.default_rng(0).normal(0, 1, tables["metrics"].height)))
        .otherwise(pl.col("value")).alias("value"))
    again = influence_table("s", noisy, DESIGN, TARGETS)
    same = again.filter((pl.col("kind") == "leave_one_out") & (pl.col("source_dataset") == "a")
                        & (pl.col("target_dataset") == "z")).row(0, named=True)
    assert same["se"] == row["se"] and same["p_value"] == row["p_value"]


def test_q_values_are_benjamini_hochberg_and_adjusted_intervals_agree_with_them(tables):
    primary_pair = tables["influence"].filter((pl.col("family") == "primary") & (pl.col("kind") == "pair"))
    q = stats.false_discovery_control(primary_pair["p_value"].to_numpy(), method="bh")
    assert primary_pair["q_value"].to_list() == pytest.approx(list(q))
    level = adjusted_alpha(list(q))
    for row in primary_pair.iter_rows(named=True):
        assert row["mde_adjusted"] == pytest.approx(minimum_detectable_effect(row["se"], row["df"], level))
        assert row["mde_adjusted"] >= row["mde"]  # equal when every row of the family is selected
    for row in tables["influence"].filter(pl.col("p_value").is_not_null()).iter_rows(named=True):
        excludes_zero = row["ci_low_adjusted"] > 0 or row["ci_high_adjusted"] < 0
        assert row["significant"] == excludes_zero, row
        assert row["ci_low_adjusted"] <= row["ci_low"] and row["ci_high_adjusted"] >= row["ci_high"]


def test_a_metric_at_its_floor(tables):
    """One side at the floor in every seed: tested (the other side varies), flagged; both
    sides at the floor: flagged, no interval."""
    row = _row(tables, "pair", "b", "a", metric="PQ")  # a alone: PQ 0 at every seed
    assert row["flag"] == "floor_one_side" and row["p_value"] is not None
    assert row["delta"] == pytest.approx(4.5)  # 0 -> 3 + seed
    floored = tables["metrics"].with_columns(pl.when(pl.col("metric") == "PQ").then(0.0).otherwise(pl.col("value"))
                                             .alias("value"))
    row = influence_table("s", floored, DESIGN, TARGETS).filter(pl.col("metric") == "PQ").row(0, named=True)
    assert row["flag"] == "floor" and row["ci_low"] is None and row["p_value"] is None and not row["significant"]


def test_the_a_a_check_splits_the_rows_own_seeds(tables):
    check = null_check(tables["influence"])
    assert check["primary"].tests == 6  # pair b -> a, a -> b; leave-one-out the same and a, b -> z
    assert check["primary"].significant_after_correction == 0 and check["primary"].passed
    assert check["secondary"].tests == 2  # a's PQ, pair and leave-one-out (its floor on one side only)
    # Seeds 2 and 3 of z's {a} runs shifted by +3: the halves of b -> z now differ, and the check says so.
    shifted = tables["metrics"].with_columns(
        pl.when((pl.col("combination") == "a") & (pl.col("eval_dataset") == "z") & (pl.col("seed") >= 2))
        .then(pl.col("value") + 3.0).otherwise(pl.col("value")).alias("value"))
    broken = null_check(influence_table("s", shifted, DESIGN, [Z_LOSS]))
    assert broken["primary"].significant_after_correction >= 1 and not broken["primary"].passed


def test_a_target_counts_only_the_trials_in_its_scope(tables):
    """z's object queries trained only where a did (b trains prompts): z's {b} trials are out
    of its scope, so b's leave-one-out row on z ({a, b} against {a}) remains and a's ({a, b}
    against {b}) goes; its correlations count only {a} and {a, b} trials."""
    scoped = Target("z", "object_queries", "val_loss", "lower", True, supervisors=frozenset({"a"}))
    assert scoped.in_scope(("a", "b")) and not scoped.in_scope(("b",))
    assert Target("a", "panoptic", "PQ", "higher", False, requires="a").in_scope(("a",))
    assert not Target("a", "panoptic", "PQ", "higher", False, requires="a").in_scope(("b",))
    influence = influence_table("s", tables["metrics"], DESIGN, [scoped])
    assert [(r["source_dataset"], r["without_datasets"]) for r in influence.iter_rows(named=True)] == [("b", ["a"])]
    correlation = correlation_table("s", tables["metrics"], [A_LOSS, scoped])
    assert set(correlation["n_trials"].to_list()) == {8}


def test_correlation_against_scipy(tables):
    row = tables["correlation"].filter((pl.col("dataset_a") == "a") & (pl.col("metric_a") == "val_loss")
                                       & (pl.col("dataset_b") == "z")).row(0, named=True)
    trials = [(c, s) for c in ("a", "a+b") for s in SEEDS]
    a = [_a_loss(c, s) for c, s in trials]
    z = [_z_loss(c, s) for c, s in trials]
    assert row["n_trials"] == 8
    assert row["pearson"] == pytest.approx(stats.pearsonr(a, z).statistic)
    assert row["spearman"] == pytest.approx(stats.spearmanr(a, z).statistic)


def test_cheap_against_exhaustive(tables):
    out = compare_estimates(RECORDS, tables["metrics"], TARGETS, DESIGN, SEEDS)
    assert out.n_pairs == 2 and out.spearman is None  # 2 pairs are too few for a rank correlation
    pairs = {(p.source_dataset, p.target_dataset): p for p in out.pairs}
    assert pairs[("a", "b")].affinity == pytest.approx(-2.0) and pairs[("b", "a")].affinity == pytest.approx(1.0)
    alone = np.mean([_a_loss("a", s) for s in SEEDS])
    with_b = np.mean([_a_loss("a+b", s) for s in SEEDS])
    assert pairs[("b", "a")].influence == pytest.approx((alone - with_b) / alone)
    # Singletons (8 x 1 h) and pairs (4 x 2 h) are the exhaustive cost; the affinity trial 2 h.
    assert out.exhaustive_trial_hours == pytest.approx(16.0) and out.affinity_trial_hours == pytest.approx(2.0)
    # Groupings of {a, b}: apart, or together (b helps a by 10 %, a hurts b by 10 %).
    assert out.grouping.partitions == 2
    assert Estimates.from_json(json.loads(json.dumps(out.to_json()))) == out  # summary.json's part reads back


def test_planted_truth_is_checked_against_the_adjusted_intervals(tables):
    from omgseg.platform.config import PlantedEffect

    truth = [PlantedEffect(source="b", target="a", effect="helps"), PlantedEffect(source="a", target="b", effect="none")]
    out = planted_check(tables["influence"], truth)
    by_pair = {(p.source, p.target): p for p in out.pairs}
    assert by_pair[("b", "a")].agrees
    row = tables["influence"].filter((pl.col("kind") == "pair") & (pl.col("source_dataset") == "b")
                                     & (pl.col("target_dataset") == "a") & (pl.col("family") == "primary")).row(0, named=True)
    assert by_pair[("b", "a")].mde == row["mde"] > 0
    assert not by_pair[("a", "b")].agrees and out.false_positives_on_none == 1  # a does hurt b
    assert out.recovered == {"helps": "1/1", "hurts": "0/0", "none": "0/1"}


def test_partitions_are_every_set_partition():
    found = list(partitions(["a", "b", "c", "d"]))
    assert len(found) == 15  # Bell(4)
    assert len({tuple(sorted(tuple(sorted(g)) for g in p)) for p in found}) == 15


def test_written_tables_read_back_equal(tables, tmp_path):
    paths = write_tables(tables, tmp_path)
    for name, path in paths.items():
        assert pl.read_parquet(path).equals(tables[name])
    assert not list(tmp_path.glob("*.partial"))


def test_record_json_round_trip():
    assert TrialRecord.from_json(RECORDS[8].to_json()) == RECORDS[8]
    with pytest.raises(ValueError, match=r"trial record: missing fields \['trial_id'"):
        TrialRecord.from_json({"combination": "a"})


# A study with a control c: every data set added to a lowers its loss by 0.3 and to b by 0.2
# (more steps, more names: what any data set does); b helps a by 0.7 more than that, a does
# nothing to b beyond it.
def _controlled_record(datasets, seed):
    combo = "+".join(datasets)
    rng = np.random.default_rng([seed, *map(ord, combo)])
    metrics = {}
    if "a" in datasets:
        loss = {"a": 10.0, "a+b": 9.0, "a+c": 9.7}[combo] + OFFSET[seed] + float(rng.normal(0, 0.03))
        metrics["a"] = DatasetEvaluation(losses={"object_queries": loss})
    if "b" in datasets:
        loss = {"b": 5.0, "a+b": 4.8, "b+c": 4.8}[combo] + OFFSET[seed] + float(rng.normal(0, 0.03))
        metrics["b"] = DatasetEvaluation(losses={"object_queries": loss})
    return TrialRecord(trial_id=f"{combo}-s{seed}", combination=combo, datasets=list(datasets),
                       ratios=[1 / len(datasets)] * len(datasets), seed=seed, steps=10 * len(datasets),
                       status="finished", wall_seconds=3600.0 * len(datasets), metrics=Evaluation(metrics),
                       samples={n: 20 for n in datasets})


CONTROLLED_GOALS = [A_LOSS, Target("b", "object_queries", "val_loss", "lower", True)]
CONTROLLED_DESIGN = StudyDesign(train=("a", "b"), combinations=(("a",), ("b",), ("a", "b"), ("a", "c"), ("b", "c")),
                                control="c")
CONTROLLED_DESIGN_WITHOUT_CONTROL = StudyDesign(train=("a", "b"), combinations=(("a",), ("b",), ("a", "b")))
CONTROLLED_RECORDS = [_controlled_record(d, s) for d in (("a",), ("b",), ("a", "b"), ("a", "c"), ("b", "c"))
                      for s in SEEDS]


@pytest.fixture(scope="module")
def controlled_tables():
    return build_tables("s", CONTROLLED_RECORDS, CONTROLLED_DESIGN, CONTROLLED_GOALS)


def test_a_control_cancels_what_any_added_data_set_does(controlled_tables):
    from omgseg.platform.config import PlantedEffect

    goals, records, tables = CONTROLLED_GOALS, CONTROLLED_RECORDS, controlled_tables
    pair, controlled = _row(tables, "pair", "a", "b"), _row(tables, "controlled", "a", "b")
    assert pair["delta"] == pytest.approx(0.2, abs=0.05) and pair["significant"]  # the generic effect, against b alone
    assert controlled["without_source"] == pytest.approx(np.mean([r.metrics.datasets["b"].losses["object_queries"]
                                                                  for r in records if r.combination == "b+c"]))
    assert abs(controlled["delta"]) < 0.05 and not controlled["significant"]
    assert _row(tables, "controlled", "b", "a")["delta"] == pytest.approx(0.7, abs=0.05)
    truth = [PlantedEffect(source="b", target="a", effect="helps"), PlantedEffect(source="a", target="b", effect="none")]
    assert planted_check(tables["influence"], truth).false_positives_on_none == 1
    out = planted_check(tables["influence"], truth, "controlled")
    assert out.kind == "controlled" and out.agree == 2 and out.false_positives_on_none == 0
    # The control's trials are not part of the exhaustive side's cost: singletons 8 x 1 h, pairs 4 x 2 h.
    assert compare_estimates(records, tables["metrics"], goals, DESIGN, SEEDS).exhaustive_trial_hours == 16.0
    # With the control, the cheap estimate is also set against the controlled influence.
    assert compare_estimates(records, tables["metrics"], goals, CONTROLLED_DESIGN, SEEDS).against_controlled is not None
    controlled = pair_influence(tables["metrics"], goals, CONTROLLED_DESIGN, controlled=True)
    assert controlled[("b", "a")] == pytest.approx(0.7 / 9.7, abs=0.01) and controlled[("a", "b")] == pytest.approx(0, abs=0.01)
    assert pair_influence(tables["metrics"], goals, CONTROLLED_DESIGN)[("a", "b")] == pytest.approx(0.2 / 5.0, abs=0.01)
    without_control = build_tables("s", records, CONTROLLED_DESIGN_WITHOUT_CONTROL, goals)["influence"]
    assert without_control.filter(pl.col("kind") == "controlled").height == 0


def test_the_controlled_rows_have_their_own_heatmap(controlled_tables):
    from omgseg.dashboards.figures import influence_heatmap

    figure = influence_heatmap(controlled_tables["influence"], "controlled")
    assert "{source, target} minus {target, control}" in figure.axes[0].get_title()


def test_the_console_names_each_planted_pair_that_does_not_agree(tables, capsys):
    from pathlib import Path

    from omgseg.platform.config import PlantedEffect
    from omgseg.platform.study.results import TABLES
    from omgseg.platform.study.summary import StudyResult, print_summary

    truth = [PlantedEffect(source="b", target="a", effect="helps"), PlantedEffect(source="a", target="b", effect="none")]
    summary = StudySummary(
        study="s", commit=None, trials=16, finished=16, failed=[], seeds=4, budget="per_dataset", significant={},
        null_check={}, pairing_ratio_median=None, estimates=compare_estimates(RECORDS, tables["metrics"], TARGETS, DESIGN, SEEDS),
        tables={}, tracking_uri="sqlite:///x.db", parent_run_id="p", driver_seconds={}, concurrent_trials=1,
        planted=planted_check(tables["influence"], truth))
    print_summary(StudyResult(out=Path("s"), parent_run_id="p", tracking_uri="sqlite:///x.db",
                              tables={t: Path(f"{t}.parquet") for t in TABLES}, summary=summary))
    assert StudySummary.from_json(json.loads(json.dumps(summary.to_json()))) == summary
    lines = capsys.readouterr().err.splitlines()
    assert any("planted effects: 1/2 agree" in line for line in lines)
    misses = [line for line in lines if "->" in line]
    assert len(misses) == 1 and "a -> b (prompt_queries): planted none, measured -0.5" in misses[0]
    assert "adjusted CI [" in misses[0] and "MDE " in misses[0]


def test_a_mixture_that_drew_nothing_of_a_data_set_counts_zero_samples():
    """A swept mixture with a tiny share may draw no sample of a data set in its steps: the runs
    table says 0 for it instead of failing the whole study's tables."""
    record = _record(("a", "b"), 0)
    record.samples = {"a": 20}  # b's share drew nothing
    runs = runs_table("t", [record])
    assert runs["samples_per_dataset"].to_list() == [[20, 0]]
