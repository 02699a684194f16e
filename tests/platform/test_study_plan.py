"""Study configs and plans without Ray: combinations, mixing, the affinity trial, errors."""

from pathlib import Path

import pytest

from omgseg.platform.config import ConfigError, StudyConfig, load_config
from omgseg.platform.study import dry_run, main, plan_trials, targets, trial_config

DEFAULT = Path(__file__).resolve().parents[2] / "studies" / "configs" / "default.yaml"
PAPER = Path(__file__).resolve().parents[2] / "studies" / "configs" / "omgseg_paper.yaml"


def _config(*overrides: str) -> StudyConfig:
    return load_config(StudyConfig, DEFAULT, list(overrides))


def test_the_default_plan():
    plan = plan_trials(_config())
    ids = [t.trial_id for t in plan]
    assert len(plan) == 14 and ids[:2] == ["coco-s0", "coco-s1"]
    assert {t.combination for t in plan} == {"coco", "vipseg", "davis", "coco+vipseg", "coco+davis", "vipseg+davis",
                                             "coco+vipseg+davis"}
    assert [t.trial_id for t in plan if t.measures_affinity] == ["coco+vipseg+davis-s0", "coco+vipseg+davis-s1"]
    assert all(r == pytest.approx(1 / len(t.datasets)) for t in plan for r in t.ratios)
    assert ("ade", "panoptic", "PQ_unseen") in targets(_config())


def test_combination_kinds_mixing_and_the_added_affinity_trial():
    config = _config("combinations=[leave_one_out, [davis, coco]]", "seeds=[3]", "mixing.policy=proportional",
                     "mixing.explicit={coco+davis: {coco: 3, davis: 1}}")
    plan = plan_trials(config, sizes={"coco": 30, "vipseg": 10, "davis": 20, "ade": 5, "ytvis": 5})
    by_id = {t.trial_id: t for t in plan}
    assert list(by_id) == ["vipseg+davis-s3", "coco+davis-s3", "coco+vipseg-s3", "coco+vipseg+davis-s3"]
    assert by_id["coco+davis-s3"].ratios == pytest.approx((0.75, 0.25))  # explicit, in config order
    assert by_id["coco+vipseg-s3"].ratios == pytest.approx((0.75, 0.25))  # proportional: 30 vs 10
    assert by_id["coco+vipseg+davis-s3"].measures_affinity  # not asked for: added to measure affinity
    with pytest.raises(ValueError, match="proportional mixing needs"):
        plan_trials(config)
    assert not any(t.measures_affinity for t in plan_trials(_config("affinity.enabled=false")))


def test_trial_configs_have_absolute_paths_and_the_study_settings(tmp_path):
    config = _config()
    trial = plan_trials(config)[-1]
    train = trial_config(config, trial, tmp_path, "sqlite:///x.db")
    assert train.data.root.is_absolute() and train.output_dir == (tmp_path / "trials" / trial.trial_id).resolve()
    assert train.mix == {"coco": pytest.approx(1 / 3), "vipseg": pytest.approx(1 / 3), "davis": pytest.approx(1 / 3)}
    assert train.affinity.every == 10 and train.eval_datasets["ade"] == ["panoptic"] and train.seed == 1
    assert train.tracking.tracking_uri == "sqlite:///x.db"  # every trial logs where the study does
    assert trial_config(config, plan_trials(config)[0], tmp_path, "sqlite:///x.db").affinity.every == 0


@pytest.mark.parametrize("override, message", [
    ("combinations=[[coco, kitti]]", r"must name distinct train data sets"),
    ("combinations=[triples]", r"unknown kind 'triples'"),
    ("evaluation={kitti: [panoptic]}", r"evaluation names data set 'kitti'"),
    ("train_datasets=[coco, kitti]", r"train_datasets names \['kitti'\]"),
    ("mixing.explicit={coco+davis: {coco: 1}}", r"mixing.explicit.coco\+davis: needs a ratio"),
    ("metrics={kitti/panoptic: [PQ]}", r"unknown data set 'kitti'"),
    ("data.datasets.coco.tasks=[vos]", r"does not annotate tasks \['vos'\]"),
    ("seeds=[1, 1]", r"seeds repeat"),
])
def test_bad_study_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        _config(override)


def test_a_missing_data_set_fails_before_any_trial(tmp_path, capsys):
    import ray

    code = main(["--out", str(tmp_path / "study"), f"data.datasets.coco.src={tmp_path / 'no_coco'}"])
    assert code == 1 and "no_coco does not exist" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "study").exists()


def test_dry_run_prints_the_plan_and_cost(capsys):
    assert main(["--config", str(PAPER), "--dry-run"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    assert plan["n_trials"] == len(plan["trials"]) and plan["per_trial"]["gpus_per_worker"] == 1
    assert plan["estimated_gpu_hours"] > 0
    out = dry_run(_config())
    assert out["n_trials"] == 14 and out["estimated_gpu_hours"] is None


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    import json

    from omgseg.platform.study import STUDY_FILE, _check_resume

    config = _config()
    (tmp_path / STUDY_FILE).write_text(json.dumps({"config": json.loads(config.model_dump_json()), "parent_run_id": "p"}))
    assert _check_resume(tmp_path, config, resume=True)["parent_run_id"] == "p"
    with pytest.raises(ValueError, match=r"differs from the study's .* in \['seeds', 'train.steps'\]"):
        _check_resume(tmp_path, _config("seeds=[5]", "train.steps=7"), resume=True)
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        _check_resume(tmp_path, config, resume=False)
    assert _check_resume(tmp_path / "new", config, resume=True) is None  # nothing there yet: a new study
