"""A sampled design and a ratio sweep run end to end on a local Ray, at a few steps: the surrogate's
rows and fits in the tables and summary.json, the swept trials recorded with their mixtures,
a recommendation from the sweep, and its verification as a study of its own."""

import os

import polars as pl
import pytest
from studyfixture import CONFIG

from omgseg.platform.records import StudySummary

SAMPLED = [  # 2 train data sets; 3 subsets (both singletons, the pair) and 3 mixtures, 2 seeds: 12 trials of 1 step a data set
    "train_datasets=[coco, davis]", "seeds=[0, 1]", "train.steps=1", "train.log_every=1",
    "train.checkpoint_every=1", "train.eval_samples=1", "train.val_samples=2", "train.affinity.enabled=false",
    "evaluation={coco: [panoptic], davis: [vos]}", "metrics={panoptic: [PQ]}",
    "combinations={sampled: {subsets: 3, sizes: [1, 2]}}", "mixing.sampled={mixtures: 3, concentration: 1.0}",
    "recommend={objectives: [coco]}", "verify={baselines: {mostly_coco: {coco: 4, davis: 1}}}",
]


@pytest.fixture(scope="module")
def sampled_study(tmp_path_factory, study_data_root):
    import ray

    from omgseg.platform.config import StudyConfig, load_config
    from omgseg.platform.study.driver import run_study
    from omgseg.platform.study.verify import verify_study

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = tmp_path_factory.mktemp("sampled") / "study"
    config = load_config(StudyConfig, CONFIG, [f"data.root={study_data_root}", *SAMPLED])
    try:
        result = run_study(config, out)
        verification = verify_study(config, out, "coco")
    finally:
        ray.shutdown()
    return config, result, verification


def test_the_sampled_design_and_the_sweep_are_trials_with_their_tables(sampled_study):
    _, result, _ = sampled_study
    runs = pl.read_parquet(result.tables["runs"])
    assert runs.height == (3 + 3) * 2 and (runs["status"] == "finished").all()
    swept = runs.filter(pl.col("mixture").is_not_null())
    assert sorted(swept["trial_id"].to_list())[:2] == ["coco+davis-m0-s0", "coco+davis-m0-s1"]
    influence = pl.read_parquet(result.tables["influence"])
    surrogate = influence.filter(pl.col("kind") == "surrogate")
    assert surrogate.height > 0 and set(surrogate["n_seeds"].to_list()) == {2}
    assert influence.filter(pl.col("kind") == "pair").height  # the subsets drawn are the pair design here
    summary = StudySummary.read(result.out)
    assert {f.dataset for f in summary.surrogate} == {"coco", "davis"}
    assert [r.objective for r in summary.recommendations] == ["coco"]
    assert summary.recommendations[0].source.startswith("ratio sweep")


def test_the_verification_is_a_study_of_its_own_and_its_verdict_is_recorded(sampled_study):
    _, result, verification = sampled_study
    assert {c.baseline for c in verification.comparisons} == {"uniform", "alone", "mostly_coco"}
    assert verification.confirmed == (not verification.not_beaten)
    folder = result.out / "verify" / "coco"
    runs = pl.read_parquet(folder / "runs.parquet")
    assert set(runs["mixture"].to_list()) == {"recommended", "uniform", "alone", "mostly_coco"} and runs.height == 8
    assert StudySummary.read(folder).verification == verification
    assert StudySummary.read(result.out).recommendations[0].verification == verification
