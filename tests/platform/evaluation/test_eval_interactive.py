"""`omgseg eval interactive`: simulated clicks of a checkpoint on COCO panoptic files give the
same numbers as the shard evaluation of the same images, and bad input names the file."""

import json

import pytest
import torch

from omgseg.datasets.convert import convert
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.model.checkpoint import save_checkpoint
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.platform.cli import main
from omgseg.platform.evaluation.clicks import evaluate_interactive_files
from omgseg.platform.evaluation.evaluate import evaluate_shards

SIZES = SynthSizes(coco_train=1, coco_val=2, ade_train=1, ade_val=1, video_train=1, video_val=1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("interactive")
    src = write_synthetic(root / "synth", ["coco-panoptic"], seed=0, sizes=SIZES)["coco-panoptic"]
    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny"))
    return src, save_checkpoint(model, root / "model.pt"), model, root


def test_files_and_shards_give_the_same_clicks(coco, monkeypatch):
    src, checkpoint, model, root = coco
    gt_json = src / "annotations" / "panoptic_val2017.json"
    files = evaluate_interactive_files(checkpoint, gt_json, src / "annotations" / "panoptic_val2017", src / "val2017",
                                       max_clicks=5, progress=False)
    gt = json.loads(gt_json.read_text())
    expected = sum(1 for a in gt["annotations"] for s in a["segments_info"] if not s.get("iscrowd", 0))
    assert files["instances"] == expected and files["images"] == 2
    assert 1 <= files["NoC@85"] <= files["NoC@90"] <= 5 and 0 <= files["NoF@90"] <= expected
    convert("coco-panoptic", src, root / "shards", "val")
    # The shard path uses the protocol's 20 clicks (platform/tasks.py); compare at 5.
    monkeypatch.setattr("omgseg.platform.tasks.MAX_CLICKS", 5)
    shards = evaluate_shards(model, root / "shards", ["interactive"])["interactive"]
    assert {k: v for k, v in files.items() if k != "images"} == pytest.approx(shards)


def test_interactive_cli_and_its_errors(coco, tmp_path, capsys):
    src, checkpoint, _, _ = coco
    gt_json = src / "annotations" / "panoptic_val2017.json"
    args = ["eval", "interactive", "--gt-json", str(gt_json), "--gt-dir", str(src / "annotations" / "panoptic_val2017"),
            "--checkpoint", str(checkpoint), "--max-clicks", "5", "--max-images", "1"]
    assert main(args + ["--image-dir", str(src / "val2017"), "--out", str(tmp_path / "r.json")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["images"] == 1 and json.loads((tmp_path / "r.json").read_text()) == printed
    assert main(args + ["--image-dir", str(tmp_path)]) == 1
    assert f"image {tmp_path}/" in capsys.readouterr().err
    assert main(args[:-4] + ["--image-dir", str(src / "val2017"), "--max-clicks", "3"]) == 1
    assert "max_clicks 3 must cover mIoU@5" in capsys.readouterr().err
    assert main(args[:2] + ["--gt-json", str(gt_json)]) == 1
    assert "eval interactive needs --gt-dir, --image-dir, --checkpoint" in capsys.readouterr().err
