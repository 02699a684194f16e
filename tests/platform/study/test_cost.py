"""The dry run's cost: each trial's training, probes and evaluation from the config's unit
costs, the conversion once, totals in trial-hours and GPU-hours, and what is missing said."""

from pathlib import Path

import pytest

from omgseg.platform.config import StudyConfig, load_config
from omgseg.platform.study.cost import study_cost
from omgseg.platform.study.plan import plan_trials

DEFAULT = Path(__file__).resolve().parents[3] / "studies" / "configs" / "default.yaml"
UNITS = ["scheduling.seconds_per_step=0.2", "scheduling.seconds_per_forward_clip=0.01",
         "scheduling.seconds_per_converted_sample=0.05", "train.val_samples=10"]


def test_each_part_follows_its_formula():
    config = load_config(StudyConfig, DEFAULT, UNITS)
    trials = plan_trials(config)
    cost = study_cost(config, trials, sizes={n: {"train": 40, "val": 8} for n in config.data.datasets})
    by_id = {t.trial_id: t for t in cost.trials}
    assert by_id["coco-s0"].training_s == pytest.approx(50 * 0.2) and by_id["coco-s0"].probes_s == 0.0
    # Evaluation: per data set min(val_samples, val split) clips + eval_samples per task (interactive: 20 clicks).
    clips = 8 * 4 + 6 * (1 + 1 + 20) + 6 * 1 + 6 * 1 + 6 * 1  # coco: panoptic, semantic, interactive; ade, vipseg, davis
    assert by_id["coco-s0"].evaluation_s == pytest.approx(clips * 0.01)
    # The probing trial: 150 steps, a probe every 10; 3 data sets: 3 look-aheads of 4 clips at 0.2 s per
    # 2-clip step, and 4 sets of weights x 3 held-out batches of 16 clips.
    probe = 3 * 0.2 * 4 / 2 + 4 * 3 * 16 * 0.01
    assert by_id["coco+vipseg+davis-s0"].probes_s == pytest.approx(15 * probe)
    out = cost.to_json()
    total = sum(t.total_s for t in cost.trials)
    assert out["trial_hours"] == pytest.approx(total / 3600) and out["gpu_hours"] == 0.0  # CPU trials
    assert out["seconds"]["conversion_cpu"] == pytest.approx(5 * 48 * 0.05) and out["missing"] == []


def test_what_a_part_needs_is_named_when_it_is_missing():
    config = load_config(StudyConfig, DEFAULT, ["scheduling.seconds_per_step=0.2"])
    cost = study_cost(config, plan_trials(config))
    out = cost.to_json()
    assert out["seconds"]["training"] == pytest.approx(sum(t.steps for t in plan_trials(config)) * 0.2)
    assert out["seconds"]["evaluation"] is None and out["trial_hours"] is None
    assert "seconds_per_forward_clip" in out["missing"] and any("omgseg prepare" in m for m in out["missing"])


def test_gpu_hours_count_every_worker():
    config = load_config(StudyConfig, DEFAULT, [*UNITS, "train.resources={workers: 4, use_gpu: true}"])
    out = study_cost(config, plan_trials(config), sizes={n: {"train": 40, "val": 8} for n in config.data.datasets}).to_json()
    assert out["gpu_hours"] == pytest.approx(4 * out["trial_hours"])


def test_a_sampled_design_is_costed_beside_the_exhaustive_one():
    from omgseg.platform.study.plan import dry_run

    planted = DEFAULT.parent / "planted.yaml"
    config = load_config(StudyConfig, planted, ["combinations={sampled: {subsets: 5, sizes: [3]}}",
                                                "train.affinity.enabled=false", *UNITS])
    out = dry_run(config, sizes={n: {"train": 40, "val": 8} for n in config.data.datasets})
    reference = out["exhaustive_design"]
    assert reference["n_trials"] == 14 * 6 and "anchor+placebo" in reference["combinations"]
    # 5 subsets of 3 data sets against 4 singletons, 6 pairs and 4 control pairs: 15 against 24 data-set units.
    assert out["cost"]["seconds"]["training"] == pytest.approx(15 * 40 * 6 * 0.2)
    assert reference["seconds"]["training"] == pytest.approx(24 * 40 * 6 * 0.2)
    assert out["cost_against_exhaustive"] < 1
