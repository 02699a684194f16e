"""Study configs and plans without Ray: combinations, budgets, mixing, the affinity trials,
targets and their directions, and errors that name the key."""

import json
from pathlib import Path

import pytest

from omgseg.platform.config import ConfigError, StudyConfig, load_config
from omgseg.platform.study.driver import main
from omgseg.platform.study.plan import dry_run, plan_trials, targets, trial_config

DEFAULT = Path(__file__).resolve().parents[3] / "studies" / "configs" / "default.yaml"
PAPER = Path(__file__).resolve().parents[3] / "studies" / "configs" / "omgseg_paper.yaml"


def _config(*overrides: str) -> StudyConfig:
    return load_config(StudyConfig, DEFAULT, list(overrides))


def test_the_default_plan():
    plan = plan_trials(_config())
    ids = [t.trial_id for t in plan]
    assert len(plan) == 42 and ids[:2] == ["coco-s0", "coco-s1"]
    assert {t.combination for t in plan} == {"coco", "vipseg", "davis", "coco+vipseg", "coco+davis", "vipseg+davis",
                                             "coco+vipseg+davis"}
    assert [t.trial_id for t in plan if t.measures_affinity] == ["coco+vipseg+davis-s0"]  # affinity_seeds: 1
    assert all(r == pytest.approx(1 / len(t.datasets)) for t in plan for r in t.ratios)
    # Equal exposure: k data sets, k x 50 steps.
    assert {t.combination: t.steps for t in plan} == {"coco": 50, "vipseg": 50, "davis": 50, "coco+vipseg": 100,
                                                       "coco+davis": 100, "vipseg+davis": 100, "coco+vipseg+davis": 150}
    assert {t.steps for t in plan_trials(_config("budget=total"))} == {50}


def test_targets_are_validation_losses_first_then_metrics_with_their_direction():
    found = {(t.dataset, t.task, t.metric): (t.direction, t.family) for t in targets(_config())}
    assert found[("coco", "object_queries", "val_loss")] == ("lower", "primary")
    assert found[("coco", "prompt_queries", "val_loss")] == ("lower", "primary")
    assert found[("davis", "prompt_queries", "val_loss")] == ("lower", "primary")
    assert ("davis", "object_queries", "val_loss") not in found  # VOS: prompts only
    assert found[("ade", "panoptic", "PQ_unseen")] == ("higher", "secondary")
    noc = {(t.task, t.metric): t.direction for t in targets(_config("metrics={interactive: [NoC@90, mIoU@1]}"))}
    assert noc[("interactive", "NoC@90")] == "lower" and noc[("interactive", "mIoU@1")] == "higher"


def test_combination_kinds_mixing_and_the_added_affinity_trial():
    config = _config("combinations=[leave_one_out, [davis, coco]]", "seeds=[3, 4]", "mixing.policy=proportional",
                     "mixing.explicit={coco+davis: {coco: 3, davis: 1}}", "affinity_seeds=1")
    plan = plan_trials(config, sizes={"coco": 30, "vipseg": 10, "davis": 20, "ade": 5, "ytvis": 5})
    by_id = {t.trial_id: t for t in plan}
    assert list(by_id)[::2] == ["vipseg+davis-s3", "coco+davis-s3", "coco+vipseg-s3", "coco+vipseg+davis-s3"]
    assert by_id["coco+davis-s3"].ratios == pytest.approx((0.75, 0.25))  # explicit, in config order
    assert by_id["coco+vipseg-s3"].ratios == pytest.approx((0.75, 0.25))  # proportional: 30 vs 10
    assert [t.trial_id for t in plan if t.measures_affinity] == ["coco+vipseg+davis-s3"]  # added, first seed only
    with pytest.raises(ValueError, match="proportional mixing needs"):
        plan_trials(config)
    assert not any(t.measures_affinity for t in plan_trials(_config("train.affinity.enabled=false")))


def test_a_trial_config_is_the_train_spec_with_the_trials_mix_seed_and_steps(tmp_path):
    config = _config()
    trial = plan_trials(config)[-1]
    train = trial_config(config, trial, tmp_path, f"sqlite:///{tmp_path}/x.db")
    assert train.data.root.is_absolute() and train.output_dir == tmp_path / "trials"
    assert train.mix == {"coco": pytest.approx(1 / 3), "vipseg": pytest.approx(1 / 3), "davis": pytest.approx(1 / 3)}
    assert train.steps == 150 and train.seed == 5 and not train.affinity.enabled  # only the first 2 seeds probe
    assert train.evaluation["ade"] == ["panoptic"] and train.batch == config.train.batch
    assert train.tracking.tracking_uri == f"sqlite:///{tmp_path}/x.db"  # every trial logs where the study does
    probing = next(t for t in plan_trials(config) if t.measures_affinity)
    assert trial_config(config, probing, tmp_path, "sqlite:///x.db").affinity.enabled


@pytest.mark.parametrize("override, message", [
    ("combinations=[[coco, kitti]]", r"must name distinct train data sets"),
    ("combinations=[triples]", r"unknown kind 'triples'"),
    ("evaluation={kitti: [panoptic]}", r"evaluation names data set 'kitti'"),
    ("train_datasets=[coco, kitti]", r"train_datasets names \['kitti'\]"),
    ("mixing.explicit={coco+davis: {coco: 1, kitti: 1}}", r"mixing.explicit.coco\+davis: needs a ratio"),
    ("mixing.explicit={a: {coco: 1, davis: 2}, b: {davis: 1, coco: 1}}", r"mixing.explicit.b: the same data sets as mixing.explicit.a"),
    ("metrics={kitti/panoptic: [PQ]}", r"unknown data set 'kitti'"),
    ("metrics={panoptic: [PQQ]}", r"metrics.panoptic: metric 'PQQ' has no known direction"),
    ("data.datasets.coco.tasks=[vos]", r"does not annotate tasks \['vos'\]"),
    ("seeds=[1, 1]", r"seeds repeat"),
    ("seeds=[1]", r"seeds: the influence table's intervals need at least 2 seeds"),
    ("budget=per_sample", r"budget: Input should be 'per_dataset' or 'total'"),
    ("affinity_seeds=0", r"affinity_seeds: Input should be greater than or equal to 1"),
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
    plan = json.loads(capsys.readouterr().out)
    assert plan["n_trials"] == len(plan["trials"]) == 22 and plan["per_trial"]["gpus_per_worker"] == 1
    assert plan["estimated_gpu_hours"] > 0 and plan["budget"] == "per_dataset"
    cost = plan["cost"]  # every part costed from the config's assumed unit costs and sizes
    assert cost["missing"] == [] and all(cost["seconds"][k] > 0 for k in ("training", "probes", "evaluation", "conversion_cpu"))
    assert plan["estimated_gpu_hours"] == pytest.approx(32 * plan["estimated_trial_hours"])
    assert plan["trials"][0]["training_s"] == pytest.approx(36563 * 1.2) and plan["trials"][0]["probes_s"] == 0
    out = dry_run(_config())
    assert out["n_trials"] == 42 and out["estimated_gpu_hours"] is None and out["total_steps"] == 6 * 600


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    from omgseg.platform.records import STUDY_FILE, StudyState
    from omgseg.platform.study.driver import _check_resume

    config = _config()
    state = StudyState(name="default", parent_run_id="p", tracking_uri="sqlite:///x.db",
                       config=json.loads(config.model_dump_json()))
    (tmp_path / STUDY_FILE).write_text(json.dumps(state.to_json()))
    assert _check_resume(tmp_path, config, resume=True).parent_run_id == "p"
    with pytest.raises(ValueError, match=r"differs from the study's .* in \['seeds', 'train.steps'\]"):
        _check_resume(tmp_path, _config("seeds=[5, 6]", "train.steps=7"), resume=True)
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        _check_resume(tmp_path, config, resume=False)
    assert _check_resume(tmp_path / "new", config, resume=True) is None  # nothing there yet: a new study


PLANTED = Path(__file__).resolve().parents[3] / "studies" / "configs" / "planted.yaml"


def test_the_planted_study_states_every_pair_and_pretrains(tmp_path):
    config = load_config(StudyConfig, PLANTED)
    pairs = {(p.source, p.target): p.effect for p in config.planted}
    assert len(pairs) == 12 and set(pairs.values()) == {"helps", "hurts", "none"}
    assert config.trained() == ["anchor", "twin", "rival", "stranger"] and config.pretrain.mix == {"base": 1}
    from omgseg.platform.study.plan import pretrain_config

    pretrain = pretrain_config(config, tmp_path, f"sqlite:///{tmp_path}/x.db")
    assert pretrain.mix == {"base": 1} and pretrain.steps == config.pretrain.steps and pretrain.evaluation == {}
    init = tmp_path / "pretrain.pt"
    trial = trial_config(config, plan_trials(config)[0], tmp_path, f"sqlite:///{tmp_path}/x.db", init)
    assert trial.model.init_checkpoint == init
    assert dry_run(config)["total_steps"] == sum(t.steps for t in plan_trials(config)) + config.pretrain.steps


def test_a_control_is_trained_with_every_train_data_set():
    config = load_config(StudyConfig, PLANTED)
    assert config.control == "placebo" and "placebo" not in config.trained()
    trials = plan_trials(config)
    controls = sorted({t.combination for t in trials if "placebo" in t.datasets})
    assert controls == ["anchor+placebo", "rival+placebo", "stranger+placebo", "twin+placebo"]
    assert all(t.steps == 2 * config.train.steps for t in trials if "placebo" in t.datasets)  # equal exposure
    assert len(trials) == (4 + 6 + 1 + 4) * len(config.seeds)
    without = load_config(StudyConfig, PLANTED, ["control=null"])
    assert len(plan_trials(without)) == len(trials) - 4 * len(config.seeds)


@pytest.mark.parametrize("override, message", [
    ("planted=[{source: twin, target: nobody, effect: helps}]", r"planted\[0\]\.target: 'nobody' is not a train data set"),
    ("planted=[{source: twin, target: anchor, effect: maybe}]", r"planted\.0\.effect: Input should be 'helps', 'hurts' or 'none'"),
    ("planted=[{source: twin, target: anchor, effect: helps}]", r"planted must state every ordered pair .* missing: \['anchor -> twin'"),
    ("planted=[{source: twin, target: twin, effect: helps}]", r"planted\[0\]: source and target are both 'twin'"),
    ("pretrain.mix={anchor: 1}", r"pretrain.mix: \['anchor'\] are train data sets"),
    ("pretrain.mix={kitti: 1}", r"pretrain.mix names data sets \['kitti'\]"),
    ("data.datasets.base.variant=planet", r"data.datasets.base.variant: .*unknown planted variant 'planet'; known: base, anchor"),
    ("control=nobody", r"control: 'nobody' is not a data set of data.datasets"),
    ("control=stranger", r"control: 'stranger' is a train data set"),
])
def test_bad_planted_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(StudyConfig, PLANTED, [override])


def test_a_train_config_is_a_study_train_block(tmp_path):
    """One run schema: how `omgseg train`'s example trains, pasted as a study's `train:` block,
    is read by the same typed spec; the study then sets the mix, the seed and the steps per trial."""
    import yaml

    from omgseg.platform.config import RunSpec, TrainConfig

    tiny = yaml.safe_load((DEFAULT.parent / "train_tiny.yaml").read_text())
    study = yaml.safe_load(DEFAULT.read_text())
    run_keys = set(RunSpec.model_fields)
    study["train"] = {k: v for k, v in tiny.items() if k in run_keys}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    config = load_config(StudyConfig, path)
    train = load_config(TrainConfig, DEFAULT.parent / "train_tiny.yaml")
    assert config.train == RunSpec(**{k: getattr(train, k) for k in run_keys})
    trial = plan_trials(config)[0]
    built = trial_config(config, trial, tmp_path, "sqlite:///x.db")
    assert isinstance(built, TrainConfig) and built.batch == train.batch and built.optimizer == train.optimizer
    assert built.steps == trial.steps and built.seed == trial.seed
