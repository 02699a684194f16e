"""Recommendations and their verification, on hand-made trial records of the planted config:
a ratio sweep whose truth is known (the twin helps the anchor, the rival hurts it), objectives
parsed and normalised, the subset designs' fallbacks, summary.json round trips, and the
verification's per-seed comparisons with its verdict."""

import json
from pathlib import Path

import numpy as np
import pytest

from omgseg.platform.config import StudyConfig, load_config
from omgseg.platform.records import DatasetEvaluation, Evaluation, Recommendation, StudyState, StudySummary, TrialRecord
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.plan import plan_trials, targets
from omgseg.platform.study.recommend import main, parse_objective, recommend
from omgseg.platform.study.results import build_tables, write_tables
from omgseg.platform.study.verify import RECOMMENDED, arms, compare_arms, verification_config

PLANTED = Path(__file__).resolve().parents[3] / "studies" / "configs" / "planted.yaml"
NAMES = ("anchor", "twin", "rival", "stranger")


def _loss(target: str, shares: dict[str, float], seed: int) -> float:
    """A validation loss that falls with the target's own share, more with the twin beside the
    anchor, and rises with the rival: the planted relations as a mixture surface."""
    own = shares.get(target, 0.0)
    partner = {"anchor": "twin", "twin": "anchor"}.get(target)
    value = 3.0 - 1.5 * own - (4.0 * own * shares.get(partner, 0.0) if partner else 0.0)
    value += 2.0 * own * shares.get("rival", 0.0) if target in ("anchor", "twin") else 0.0
    rng = np.random.default_rng([seed, int(own * 1000)])
    return value + 0.1 * seed + float(rng.normal(0, 0.02))


def _record(trial) -> TrialRecord:
    shares = dict(zip(trial.datasets, trial.ratios))
    metrics = Evaluation({t: DatasetEvaluation({"panoptic": {"PQ": 10.0}}, {"object_queries": _loss(t, shares, trial.seed)})
                          for t in NAMES})
    return TrialRecord(trial_id=trial.trial_id, combination=trial.combination, datasets=list(trial.datasets),
                       ratios=list(trial.ratios), seed=trial.seed, steps=trial.steps, status="finished",
                       mixture=trial.mixture, wall_seconds=60.0,
                       samples={n: round(r * 1000) for n, r in shares.items()}, metrics=metrics)


def _study(folder: Path, config: StudyConfig) -> Path:
    records = [_record(t) for t in plan_trials(config)]
    write_tables(build_tables(config.name, records, StudyDesign.from_config(config), targets(config)), folder)
    state = StudyState(name=config.name, parent_run_id="p", tracking_uri="sqlite:///x.db",
                       config=json.loads(config.model_dump_json()))
    (folder / "study.json").write_text(json.dumps(state.to_json()))
    StudySummary(study=config.name, commit=None, trials=len(records), finished=len(records), failed=[], seeds=3,
                 budget=config.budget, significant={}, null_check={}, pairing_ratio_median=None,
                 estimates=_no_estimates(), tables={}, tracking_uri="sqlite:///x.db", parent_run_id="p",
                 driver_seconds={}, concurrent_trials=1).write(folder)
    return folder


def _no_estimates():
    from omgseg.platform.records import Estimates

    return Estimates(n_pairs=0, spearman=None, permutation_p=None, bootstrap_95=None, pairs=[])


SWEEP = ["combinations=[singletons]", "seeds=[0, 1, 2]", "train.affinity.enabled=false", "control=null",
         "mixing.sampled={mixtures: 24, concentration: 1.0}"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    config = load_config(StudyConfig, PLANTED, SWEEP)
    return config, _study(tmp_path_factory.mktemp("sweep"), config)


def test_the_sweep_is_planned_as_trials_with_their_mixtures():
    config = load_config(StudyConfig, PLANTED, SWEEP)
    swept = [t for t in plan_trials(config) if t.mixture is not None]
    assert len(swept) == 24 * 3 and swept[0].trial_id == "anchor+twin+rival+stranger-m0-s0"
    assert all(t.datasets == NAMES and abs(sum(t.ratios) - 1) < 1e-9 and t.steps == 4 * 40 for t in swept)
    assert len({t.ratios for t in swept}) == 24


def test_objectives_name_targets_and_refuse_unknown_ones():
    config = load_config(StudyConfig, PLANTED, SWEEP)
    assert [t.dataset for t, _ in parse_objective("anchor", config).terms] == ["anchor"]
    assert len(parse_objective("all", config).terms) == 4
    weighted = parse_objective("anchor:2,twin/panoptic/PQ", config)
    assert [(t.metric, w) for t, w in weighted.terms] == [("val_loss", 2.0), ("PQ", 1.0)]
    with pytest.raises(ValueError, match="'kitti' names no target"):
        parse_objective("kitti", config)
    with pytest.raises(ValueError, match="weight 'x' of 'anchor' is not a number"):
        parse_objective("anchor:x", config)


def test_the_anchor_is_recommended_with_the_twin_and_without_the_rival(sweep):
    _, folder = sweep
    rec = recommend(folder, "anchor")
    assert "twin" in rec.subset and "rival" not in rec.subset and "anchor" in rec.subset
    assert rec.source.startswith("ratio sweep: Scheffé quadratic model over 24 mixtures x 3 seeds")
    low, high = rec.predicted_ci
    assert low <= rec.predicted <= high and rec.bootstraps > 100
    assert rec.in_subset["twin"] > 0.8 and rec.in_subset["rival"] < 0.2
    assert Recommendation.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_the_command_writes_summary_json_and_says_what_it_found(sweep, capsys):
    _, folder = sweep
    assert main([str(folder), "--objective", "anchor", "--objective", "all"]) == 0
    out = capsys.readouterr().out
    assert "objective 'anchor': train anchor + twin" in out and "objective 'all'" in out
    summary = StudySummary.read(folder)
    assert [r.objective for r in summary.recommendations] == ["anchor", "all"]
    all_four = summary.recommendations[1]
    assert len(all_four.terms) == 4 and all(t.scale > 0 for t in all_four.terms)  # normalised: several targets
    assert main([str(folder), "--objective", "anchor"]) == 0  # replaced, not added twice
    assert [r.objective for r in StudySummary.read(folder).recommendations] == ["all", "anchor"]
    assert main([str(folder / "nowhere")]) == 1 and "is not a study folder" in capsys.readouterr().err


def test_without_a_sweep_the_best_measured_combination(tmp_path):
    config = load_config(StudyConfig, PLANTED, ["seeds=[0, 1, 2]", "train.affinity.enabled=false", "control=null"])
    rec = recommend(_study(tmp_path, config), "anchor")
    assert rec.subset == ["anchor", "twin"] and rec.source.startswith("trained combinations")
    assert rec.shares == {"anchor": 0.5, "twin": 0.5, "rival": 0.0, "stranger": 0.0}


def test_a_sampled_design_recommends_through_its_surrogate(tmp_path):
    config = load_config(StudyConfig, PLANTED, ["seeds=[0, 1, 2]", "train.affinity.enabled=false", "control=null",
                                                "combinations={sampled: {subsets: 11, sizes: [2, 3, 4]}}"])
    rec = recommend(_study(tmp_path, config), "anchor")
    assert rec.source.startswith("sampled design") and "twin" in rec.subset and "rival" not in rec.subset


def _arm_record(label: str, seed: int, ratios: dict[str, float], gain: float) -> TrialRecord:
    datasets = [n for n in NAMES if n in ratios]
    loss = 3.0 + 0.1 * seed - gain + 0.03 * np.sin(3 * seed + len(label))  # each arm its own noise
    return TrialRecord(trial_id=f"{label}-s{seed}", combination="+".join(datasets), datasets=datasets,
                       ratios=[ratios[n] for n in datasets], seed=seed, steps=40, status="finished", mixture=label,
                       metrics=Evaluation({"anchor": DatasetEvaluation(losses={"object_queries": loss})}))


def test_verification_compares_each_baseline_seed_by_seed(sweep, tmp_path):
    config, folder = sweep
    rec = recommend(folder, "anchor")
    vconfig = verification_config(load_config(StudyConfig, PLANTED, [*SWEEP, "verify.baselines={hand: {anchor: 3, twin: 1}}"]),
                                  rec)
    assert set(vconfig.arms) == {RECOMMENDED, "uniform", "alone", "hand"} and vconfig.mixing.sampled is None
    assert vconfig.arms["uniform"] == {n: 1.0 for n in NAMES} and vconfig.arms["alone"] == {"anchor": 1.0}
    assert [t.trial_id for t in plan_trials(vconfig)][:2] == ["recommended-s0", "recommended-s1"]
    gains = {RECOMMENDED: 1.0, "uniform": 0.2, "alone": 0.5, "hand": 0.98}  # the hand-set mix is as good
    records = [_arm_record(label, s, vconfig.arms[label], gains[label]) for label in gains for s in (0, 1, 2, 3)]
    tables = build_tables("v", records, StudyDesign.from_config(vconfig), targets(vconfig))
    result = compare_arms(tables["runs"], tables["metrics"], vconfig, rec, tmp_path)
    by = {c.baseline: c for c in result.comparisons}
    assert by["uniform"].delta == pytest.approx(0.8, abs=0.05) and by["uniform"].beaten and by["alone"].beaten
    assert not by["hand"].beaten and result.not_beaten == ["hand"] and not result.confirmed
    assert by["uniform"].ci_low_adjusted <= by["uniform"].ci_low  # adjusted over the three baselines
    assert arms(config, rec)[RECOMMENDED] == {n: v for n, v in rec.shares.items() if v > 0}


def test_a_verified_arm_that_leaves_a_target_out_is_charged_its_untrained_value():
    """A fit learns a term only from trials that trained its target; a verification scores every
    arm on every term, so a recommendation that drops the rival for "all" pays the rival's loss."""
    import polars as pl

    from omgseg.platform.study.recommend import objective_values

    config = load_config(StudyConfig, PLANTED, ["combinations=[]", "control=null"])
    objective = parse_objective("rival", config)
    metrics = pl.DataFrame({"trial_id": ["with", "without"], "train_datasets": [["anchor", "rival"], ["anchor"]],
                            "eval_dataset": ["rival", "rival"], "task": ["object_queries"] * 2,
                            "metric": ["val_loss"] * 2, "value": [2.0, 14.0]})
    assert objective_values(metrics, objective, ["with", "without"])[0] == {"with": 2.0}
    assert objective_values(metrics, objective, ["with", "without"], scoped=False)[0] == {"with": 2.0, "without": 14.0}
