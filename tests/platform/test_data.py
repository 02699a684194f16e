"""Preparing a config's data: only the splits it reads, a shared source converted once, and a
val split without annotations refused before anything trains on it."""

import json
from pathlib import Path

import pytest
import yaml

from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.platform.config import ConfigError, StudyConfig, TrainConfig, load_config
from omgseg.platform.data import prepare_data

PAPER = Path(__file__).resolve().parents[2] / "studies" / "configs" / "omgseg_paper.yaml"
SIZES = SynthSizes(coco_train=4, coco_val=2, ade_train=2, ade_val=2, video_train=3, video_val=2, min_frames=5,
                   max_frames=6)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("src"), formats=["coco-panoptic", "coco-instances", "ade-panoptic"],
                           sizes=SIZES)


def _study(tmp_path, sources, **extra) -> StudyConfig:
    raw = {
        "name": "s",
        "data": {"root": str(tmp_path / "data"), "datasets": {
            "coco": {"format": "coco-panoptic", "src": str(sources["coco-panoptic"]), "tasks": ["panoptic"]},
            "coco_sam": {"format": "coco-panoptic", "src": str(sources["coco-panoptic"]), "tasks": ["interactive"]},
            "ade": {"format": "ade-panoptic", "src": str(sources["ade-panoptic"])}}},
        "train_datasets": ["coco", "coco_sam"],
        "evaluation": {"coco": ["panoptic"], "coco_sam": ["interactive"], "ade": ["panoptic"]},
        "train": {"affinity": {"enabled": False}},
        **extra,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    return load_config(StudyConfig, tmp_path / "study.yaml")


def test_a_shared_source_is_converted_once_and_unread_splits_not_at_all(tmp_path, sources):
    config = _study(tmp_path, sources)
    assert config.splits_read() == {"coco": {"train", "val"}, "coco_sam": {"train", "val"}, "ade": {"val"}}
    dirs = prepare_data(config.data, config.splits_read())
    assert dirs["coco_sam"] == dirs["coco"] == {s: tmp_path / "data" / "shards" / "coco" / s for s in ("train", "val")}
    assert dirs["ade"] == {"val": tmp_path / "data" / "shards" / "ade" / "val"}
    written = sorted(str(p.parent.relative_to(tmp_path / "data" / "shards")) for p in (tmp_path / "data").rglob("meta.json"))
    assert written == ["ade/val", "coco/train", "coco/val"]


def test_an_evaluated_val_split_without_annotations_fails_at_config_time(tmp_path):
    src = tmp_path / "ytvis2019"  # YouTube-VIS's layout; its public valid.json has no annotations
    src.mkdir()
    videos = [{"id": 1, "width": 64, "height": 48, "length": 2, "file_names": ["v1/0.jpg", "v1/1.jpg"]}]
    (src / "valid.json").write_text(json.dumps({"videos": videos, "categories": [{"id": 1, "name": "cat"}]}))
    raw = {"name": "r", "mix": {"ytvis": 1}, "evaluation": {"ytvis": ["video_instance"]},
           "data": {"root": str(tmp_path / "data"), "datasets": {"ytvis": {"format": "ytvis", "src": str(src)}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data set 'ytvis': the val split of .* has no annotations.*set "
                                          r"data\.datasets\.ytvis\.val_from_train") as err:
        load_config(TrainConfig, tmp_path / "run.yaml")
    assert len(str(err.value).splitlines()) == 2  # the file's line, and this one
    # Held out of train, it is fine; so is a val split nothing reads.
    load_config(TrainConfig, tmp_path / "run.yaml", ["data.datasets.ytvis.val_from_train={count: 1}"])
    load_config(TrainConfig, tmp_path / "run.yaml", ["evaluation={}"])
    with pytest.raises(ConfigError, match="has no annotations"):  # the public release, when the source is not here
        load_config(TrainConfig, tmp_path / "run.yaml", [f"data.datasets.ytvis.src={tmp_path / 'elsewhere'}"])
    with pytest.raises(ConfigError, match="give fraction .* or count"):
        load_config(TrainConfig, tmp_path / "run.yaml", ["data.datasets.ytvis.val_from_train={}"])


def test_the_paper_config_holds_out_ytvis_and_reads_what_it_uses():
    config = load_config(StudyConfig, PAPER)
    assert config.data.datasets["ytvis"].val_from_train.fraction == 0.1
    splits = config.splits_read()
    assert splits["ade"] == {"val"} and splits["ytvis"] == {"train", "val"}
    assert config.data.shard_dir("coco_sam", "train") == config.data.shard_dir("coco", "train")
    with pytest.raises(ConfigError, match=r"data set 'ytvis'.*data\.datasets\.ytvis\.val_from_train"):
        load_config(StudyConfig, PAPER, ["data.datasets.ytvis.val_from_train=null"])


def test_val_shards_without_an_annotated_sample_fail_when_prepared(tmp_path, sources):
    src = tmp_path / "coco"  # the instances layout, its val annotations removed
    src.mkdir()
    (src / "val2017").symlink_to(sources["coco-instances"] / "val2017")
    (src / "annotations").mkdir()
    doc = json.loads((sources["coco-instances"] / "annotations" / "instances_val2017.json").read_text())
    (src / "annotations" / "instances_val2017.json").write_text(json.dumps({**doc, "annotations": []}))
    raw = {"name": "r", "mix": {"mine": 1}, "evaluation": {"mine": ["instance"]},
           "data": {"root": str(tmp_path / "data"), "datasets": {"mine": {"format": "coco-instances", "src": str(src)}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(TrainConfig, tmp_path / "run.yaml")
    with pytest.raises(ValueError, match=r"data set 'mine': its val shards at .* hold no annotated sample.*"
                                         r"data\.datasets\.mine\.val_from_train"):
        prepare_data(config.data, {"mine": ["val"]})
