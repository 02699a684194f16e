"""The typed evaluation record: one class writes and reads it, a bad one names what is wrong."""

import json

import pytest

from omgseg.platform.records import DatasetEvaluation, Evaluation, RunReport, Score, TrialRecord

EVALUATION = Evaluation({
    "coco": DatasetEvaluation({"panoptic": {"PQ": 40.0, "N": 3, "per_class": {"1": {"PQ": 40.0}}},
                               "interactive": {"mIoU@1": 70.0, "NoC@90": 4.5}},
                              {"object_queries": 1.5, "prompt_queries": 0.7}),
    "davis": DatasetEvaluation({"vos": {"J&F": 60.0}}, {"prompt_queries": 0.9}),
})


def test_scores_are_every_scalar_and_every_loss():
    scores = EVALUATION.scores()
    assert Score("coco", "panoptic", "PQ", 40.0) in scores and Score("coco", "prompt_queries", "val_loss", 0.7) in scores
    assert not [s for s in scores if s.metric == "per_class"]
    assert {s.key for s in scores if s.dataset == "davis"} == {"davis/vos/J&F", "davis/prompt_queries/val_loss"}


def test_records_carry_it_through_json():
    again = Evaluation.from_json(json.loads(json.dumps(EVALUATION.to_json())))
    assert again == EVALUATION
    report = RunReport(steps=3, samples={"coco": 6}, seconds={"eval": 1.0}, evaluation=EVALUATION)
    assert RunReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    record = TrialRecord(trial_id="coco-s0", combination="coco", datasets=["coco"], ratios=[1.0], seed=0, steps=3,
                         status="finished", metrics=EVALUATION)
    assert TrialRecord.from_json(json.loads(json.dumps(record.to_json()))).metrics == EVALUATION
    assert TrialRecord.from_json({**record.to_json(), "metrics": {}}).metrics == Evaluation()


@pytest.mark.parametrize("bad, message", [
    ([], "an evaluation is an object of data sets"),
    ({"coco": {"panoptic": {"PQ": 1.0}}}, "data set 'coco' needs exactly 'tasks' and 'losses'"),
    ({"coco": {"tasks": {}, "losses": {"object_queries": "low"}}}, "losses are numbers"),
])
def test_a_bad_evaluation_names_the_data_set(bad, message):
    with pytest.raises(ValueError, match=message):
        Evaluation.from_json(bad, "trial.json")
