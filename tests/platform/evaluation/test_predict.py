"""Writers produce files the evaluators score as the reference would; `omgseg predict` end to end."""

import json

import numpy as np
import pytest
import torch

from omgseg.core.structures import Category
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.model.checkpoint import save_checkpoint
from omgseg.model.config import model_config
from omgseg.model.inference import PanopticResult, PredictedSegment
from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.cli import main
from omgseg.platform.evaluation.metrics.panoptic import evaluate_coco_panoptic
from omgseg.platform.evaluation.metrics.video_instance import evaluate_ytvis
from omgseg.platform.evaluation.writers import CocoPanopticWriter, YtvisWriter

SIZES = SynthSizes(coco_train=1, coco_val=3, ade_train=1, ade_val=1, video_train=1, video_val=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synth"), ["coco-panoptic", "ytvis"], seed=0, sizes=SIZES)


def test_panoptic_writer_output_of_the_ground_truth_scores_100(synth, tmp_path):
    from omgseg.datasets.formats import get_format

    reader = get_format("coco-panoptic")
    categories = reader.categories(synth["coco-panoptic"], "val")
    vocab = Vocabulary.from_categories(categories)
    gt_json = synth["coco-panoptic"] / "annotations" / "panoptic_val2017.json"
    images = {i["file_name"]: i["id"] for i in json.loads(gt_json.read_text())["images"]}
    writer = CocoPanopticWriter(tmp_path, vocab)
    for clip in reader.clips(synth["coco-panoptic"], "val"):
        ids = torch.from_numpy(clip.id_maps.astype(np.int64))
        segments = tuple(PredictedSegment(s.id, vocab.index_of(s.category_id), 1.0, True, 0)
                         for s in clip.segments if not s.iscrowd)
        kept = torch.zeros_like(ids)
        for s in segments:
            kept[ids == s.id] = s.id
        writer.add(images[clip.frame_names[0]], clip.frame_names[0], PanopticResult(kept, segments))
    writer.close()
    out = evaluate_coco_panoptic(gt_json, gt_json.with_suffix(""), tmp_path / "panoptic.json", tmp_path / "panoptic")
    assert out["PQ"] == pytest.approx(100)


def test_ytvis_writer_output_of_the_ground_truth_scores_100(synth, tmp_path):
    import pycocotools.mask as mask_utils

    gt_path = synth["ytvis"] / "valid.json"
    gt = json.loads(gt_path.read_text())
    vocab = Vocabulary.from_categories([Category(c["id"], c["name"], True) for c in gt["categories"]])
    writer = YtvisWriter(tmp_path, vocab)
    for video in gt["videos"]:
        anns = [a for a in gt["annotations"] if a["video_id"] == video["id"] and not a.get("iscrowd")]
        h, w = video["height"], video["width"]
        tubes = np.zeros((len(anns), len(video["file_names"]), h, w), bool)
        for k, a in enumerate(anns):
            for t, seg in enumerate(a["segmentations"]):
                if seg is not None:
                    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
                    tubes[k, t] = mask_utils.decode(rle).astype(bool)
        writer.add(video["id"], tubes, [vocab.index_of(a["category_id"]) for a in anns], [0.9] * len(anns))
    writer.close()
    assert evaluate_ytvis(gt_path, tmp_path / "ytvis_results.json")["AP"] == pytest.approx(100)


def test_predict_command_writes_files_that_eval_reads(synth, tmp_path, capsys):
    gt_json = synth["coco-panoptic"] / "annotations" / "panoptic_val2017.json"
    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny"))
    checkpoint = save_checkpoint(model, tmp_path / "model.pt")
    args = ["predict", "--checkpoint", str(checkpoint), "--task", "panoptic", "--input", str(synth["coco-panoptic"] / "val2017"),
            "--out", str(tmp_path / "pred"), "--coco-json", str(gt_json)]
    assert main(args) == 1  # the checkpoint holds no vocabulary: told to give one
    assert "pass --vocabulary" in capsys.readouterr().err
    assert main([*args, "--vocabulary", str(gt_json)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["inputs"] == 3 and len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == 3
    assert main(["eval", "coco-panoptic", "--gt-json", str(gt_json), "--gt-dir", str(gt_json.with_suffix("")),
                 "--pred-json", str(tmp_path / "pred" / "panoptic.json"), "--pred-dir", str(tmp_path / "pred" / "panoptic")]) == 0
    assert "PQ" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    video = sorted((synth["ytvis"] / "valid" / "JPEGImages").iterdir())[0]
    assert main(["predict", "--checkpoint", str(checkpoint), "--task", "video_instance", "--input", str(video),
                 "--out", str(tmp_path / "vid"), "--vocabulary", str(synth["ytvis"] / "valid.json"), "--clip-length", "3"]) == 0
    results = json.loads((tmp_path / "vid" / "ytvis_results.json").read_text())
    frames = len(list(video.iterdir()))
    assert all(len(r["segmentations"]) == frames for r in results)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(OMGSeg(model_config("tiny")), tmp_path_factory.mktemp("ckpt") / "model.pt")


def test_predict_vos_interactive_and_video_panoptic(synth, tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    from omgseg.platform.evaluation.metrics.vos import evaluate_davis

    sizes = SynthSizes(coco_train=1, coco_val=1, ade_train=1, ade_val=1, video_train=1, video_val=1)
    written = write_synthetic(tmp_path / "d", ["vipseg", "davis"], seed=0, sizes=sizes)
    davis = written["davis"]
    sequence = sorted((davis / "JPEGImages" / "480p").iterdir())[0]
    annotations = davis / "Annotations" / "480p" / sequence.name
    first_mask = sorted(annotations.iterdir())[0]
    vocab = str(synth["ytvis"] / "valid.json")
    base = ["predict", "--checkpoint", str(tiny_checkpoint), "--vocabulary", vocab]

    assert main([*base, "--task", "vos", "--input", str(sequence), "--out", str(tmp_path / "vos"),
                 "--first-frame-mask", str(first_mask), "--clip-length", "3"]) == 0
    predicted = tmp_path / "vos" / "vos" / sequence.name
    frames = sorted(predicted.glob("*.png"))
    assert len(frames) == len(list(sequence.iterdir()))
    with Image.open(frames[0]) as a, Image.open(first_mask) as b:
        assert a.mode == "P" and np.array_equal(np.asarray(a), np.asarray(b))  # frame 0 is the given mask
    import shutil

    shutil.copytree(annotations, tmp_path / "gt" / sequence.name)  # a ground-truth folder of this sequence only
    result = evaluate_davis(tmp_path / "gt", tmp_path / "vos" / "vos")
    assert 0 <= result["J&F"] <= 100 and result["objects"] >= 1

    image = sorted((synth["coco-panoptic"] / "val2017").iterdir())[0]
    assert main([*base, "--task", "interactive", "--input", str(image), "--out", str(tmp_path / "clicks"),
                 "--points", "10,20;60.5,40"]) == 0
    with Image.open(tmp_path / "clicks" / "interactive" / f"{image.stem}.png") as mask:
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}
    assert main([*base, "--task", "interactive", "--input", str(image), "--out", str(tmp_path / "c2"),
                 "--points", "5000,1"]) == 1
    assert "outside" in capsys.readouterr().err
    assert main([*base, "--task", "interactive", "--input", str(image), "--out", str(tmp_path / "c3")]) == 1
    assert "interactive needs --points" in capsys.readouterr().err

    # Video panoptic writes VIPSeg's result format, which `eval vipseg` scores against the
    # ground truth VIPSeg's create_panoptic_video_labels.py layout gives (one val video here).
    vipseg = written["vipseg"] / "VIPSeg_720P"
    gt_json = vipseg / "panoptic_gt_VIPSeg_val.json"
    (video_id,) = [v["video_id"] for v in json.loads(gt_json.read_text())["videos"]]
    video = vipseg / "images" / video_id
    names = [f"{p.stem}.png" for p in sorted(video.iterdir())]
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--vocabulary", str(gt_json), "--task", "video_panoptic",
                 "--input", str(video), "--out", str(tmp_path / "vps"), "--clip-length", "3"]) == 0
    capsys.readouterr()
    (record,) = json.loads((tmp_path / "vps" / "pred.json").read_text())["annotations"]
    assert record["video_id"] == video_id and [a["file_name"] for a in record["annotations"]] == names
    assert sorted(p.name for p in (tmp_path / "vps" / "pan_pred" / video_id).iterdir()) == names
    assert len(list((tmp_path / "vps" / "overlays").glob("*.png"))) == len(names)
    assert main(["eval", "vipseg", "--gt-json", str(gt_json), "--gt-dir", str(vipseg / "panomasksRGB"),
                 "--pred-json", str(tmp_path / "vps" / "pred.json"), "--pred-dir", str(tmp_path / "vps" / "pan_pred")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["videos"] == 1 and result["frames"] == len(names) and 0 <= result["VPQ"] <= 100
    assert {f"VPQ@{n}" for n in (1, 2, 4, 6, 8)} <= set(result)  # 8+ frames: every VIPSeg window


def test_predict_video_panoptic_on_a_folder_of_videos_writes_one_pred_json(tiny_checkpoint, tmp_path, capsys):
    from omgseg.platform.cli import main

    sizes = SynthSizes(coco_train=1, coco_val=1, ade_train=1, ade_val=1, video_train=1, video_val=2)
    vipseg = write_synthetic(tmp_path / "d", ["vipseg"], seed=0, sizes=sizes)["vipseg"] / "VIPSeg_720P"
    gt_json = vipseg / "panoptic_gt_VIPSeg_val.json"
    videos = [v["video_id"] for v in json.loads(gt_json.read_text())["videos"]]
    listing = tmp_path / "val.txt"  # images/ holds both splits: predict the val videos
    listing.write_text("\n".join(videos) + "\n")
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--vocabulary", str(gt_json), "--task", "video_panoptic",
                 "--input", str(vipseg / "images"), "--videos", str(listing), "--out", str(tmp_path / "vps"),
                 "--clip-length", "4"]) == 0
    records = json.loads((tmp_path / "vps" / "pred.json").read_text())["annotations"]
    assert [r["video_id"] for r in records] == videos
    assert all((tmp_path / "vps" / "overlays" / v).is_dir() for v in videos)
    capsys.readouterr()
    assert main(["eval", "vipseg", "--gt-json", str(gt_json), "--gt-dir", str(vipseg / "panomasksRGB"),
                 "--pred-json", str(tmp_path / "vps" / "pred.json"), "--pred-dir", str(tmp_path / "vps" / "pan_pred")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["videos"] == len(videos)
    listing.write_text("val_9999_vip\n")
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--vocabulary", str(gt_json), "--task", "video_panoptic",
                 "--input", str(vipseg / "images"), "--videos", str(listing), "--out", str(tmp_path / "x")]) == 1
    assert "val_9999_vip" in capsys.readouterr().err
