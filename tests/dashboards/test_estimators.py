"""The estimator table of a planted study, on hand-made study folders of the planted config whose
losses follow its truth: the exhaustive design's controlled rows, a sampled design's
surrogate rows and the TAG probe, each against the truth and the exhaustive influence."""

import json
from pathlib import Path

import numpy as np
import pytest

from omgseg.dashboards.estimators import estimator_table, main, markdown
from omgseg.dashboards.report import StudyTables
from omgseg.platform.config import StudyConfig, load_config
from omgseg.platform.records import DatasetEvaluation, Estimates, Evaluation, StudyState, StudySummary, TrialRecord
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.plan import plan_trials, targets
from omgseg.platform.study.results import build_tables, write_tables

PLANTED = Path(__file__).resolve().parents[2] / "studies" / "configs" / "planted.yaml"
TRUTH = {"helps": -0.8, "hurts": 1.0, "none": 0.0}  # on the target's loss
GENERIC = -0.3  # what any added data set does, the placebo included


def _loss(config: StudyConfig, target: str, datasets: tuple, seed: int) -> float:
    effect = {(p.source, p.target): TRUTH[p.effect] for p in config.planted}
    value = 5.0 + 0.2 * seed + sum(GENERIC + effect.get((n, target), 0.0) for n in datasets if n != target)
    return value + float(np.random.default_rng([seed, *map(ord, "".join(datasets))]).normal(0, 0.05))


def _folder(folder: Path, config: StudyConfig, affinity: bool = False) -> Path:
    records = []
    for t in plan_trials(config):
        metrics = Evaluation({n: DatasetEvaluation(losses={"object_queries": _loss(config, n, t.datasets, t.seed)})
                              for n in config.trained()})
        z = {s: {j: -100 * ({(p.source, p.target): TRUTH[p.effect] for p in config.planted}.get((s, j), 0.0)) for j in t.datasets}
             for s in t.datasets} if t.measures_affinity and affinity else {}
        se = {s: {j: 10.0 for j in t.datasets} for s in t.datasets} if z else {}
        records.append(TrialRecord(trial_id=t.trial_id, combination=t.combination, datasets=list(t.datasets),
                                   ratios=list(t.ratios), seed=t.seed, steps=t.steps, status="finished",
                                   measures_affinity=t.measures_affinity, wall_seconds=10.0 * len(t.datasets),
                                   metrics=metrics, affinity=z, affinity_se=se))
    write_tables(build_tables(config.name, records, StudyDesign.from_config(config), targets(config)), folder)
    (folder / "study.json").write_text(json.dumps(StudyState(config.name, "p", "sqlite:///x.db",
                                                             json.loads(config.model_dump_json())).to_json()))
    StudySummary(study=config.name, commit=None, trials=len(records), finished=len(records), failed=[], seeds=3,
                 budget=config.budget, significant={}, null_check={}, pairing_ratio_median=None,
                 estimates=Estimates(n_pairs=0, spearman=None, permutation_p=None, bootstrap_95=None, pairs=[]),
                 tables={}, tracking_uri="sqlite:///x.db", parent_run_id="p", driver_seconds={},
                 concurrent_trials=1).write(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimators")
    seeds = "seeds=[0, 1, 2]"
    reference = load_config(StudyConfig, PLANTED, [seeds])
    sampled = load_config(StudyConfig, PLANTED, [seeds, "combinations={sampled: {subsets: 10, sizes: [3]}}",
                                                 "train.affinity.enabled=false"])
    (root / "ref").mkdir()
    (root / "k10").mkdir()
    return _folder(root / "ref", reference, affinity=True), _folder(root / "k10", sampled)


def test_every_estimator_against_the_truth(folders):
    reference, sampled = folders
    rows = estimator_table(StudyTables(reference), [StudyTables(sampled)])
    exhaustive, surrogate, tag = rows
    assert exhaustive.estimator == "exhaustive pairs (controlled rows)"
    assert exhaustive.helps_hurts_recovered == "6/6" and exhaustive.false_positives_on_none == "0/6"
    assert exhaustive.spearman_vs_exhaustive == 1.0
    # Exhaustive: 4 singletons + 6 pairs + 4 control pairs at 3 seeds, 10 s a data set.
    assert exhaustive.trial_hours == pytest.approx(3 * (4 * 10 + 10 * 20) / 3600)
    assert surrogate.estimator == "sampled, 10 subsets of 3 a seed (surrogate_controlled rows)"
    assert surrogate.helps_hurts_recovered == "6/6" and surrogate.false_positives_on_none == "0/6"
    assert surrogate.spearman_vs_exhaustive > 0.9 and surrogate.trial_hours == pytest.approx(3 * 10 * 30 / 3600)
    assert tag.estimator.startswith("TAG") and tag.helps_hurts_recovered == "6/6" and tag.false_positives_on_none == "0/6"
    table = markdown(rows)
    assert table.count("\n") == 4 and "| sampled, 10 subsets of 3 a seed" in table


def test_the_command_prints_the_table_and_refuses_a_study_that_is_not_sampled(folders, capsys):
    reference, sampled = folders
    assert main(["--reference", str(reference), "--sampled", str(sampled)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| estimator |") and json.loads(out[-1])["benchmark"] == "estimators"
    assert main(["--reference", str(reference), "--sampled", str(reference)]) == 1
    assert "is not a study of a sampled design" in capsys.readouterr().err


def test_an_earlier_versions_reference_is_recomputed_from_its_metrics(folders, tmp_path, capsys):
    """A reference whose metrics table lacks train_datasets and mixture (an earlier version),
    whose saved config holds a key this version no longer reads, and whose influence table is
    stale: --recompute gives the rows the current code builds from the same trials."""
    import polars as pl

    reference, sampled = folders
    old = tmp_path / "old"
    old.mkdir()
    for name in ("runs", "affinity"):
        (old / f"{name}.parquet").write_bytes((reference / f"{name}.parquet").read_bytes())
    pl.read_parquet(reference / "metrics.parquet").drop("train_datasets", "mixture").write_parquet(old / "metrics.parquet")
    state = json.loads((reference / "study.json").read_text())
    state["config"]["data"]["splits"] = ["train", "val"]
    (old / "study.json").write_text(json.dumps(state))
    config = ["--config", str(PLANTED), "--reference"]
    assert main([*config, str(reference), "--sampled", str(sampled)]) == 0
    fresh = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["--recompute", *config, str(old), "--sampled", str(sampled)]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert again["rows"] == fresh["rows"] and fresh["rows"][0]["helps_hurts_recovered"] == "6/6"
    other = tmp_path / "other"
    other.mkdir()
    state["config"]["name"] = "another"
    (other / "study.json").write_text(json.dumps(state))
    assert main(["--recompute", *config, str(other)]) == 1
    assert "is not the config's" in capsys.readouterr().err
