"""YouTube-VIS AP: tube IoU by hand, absent frames, perfect/empty, errors."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.video_instance import VideoInstanceEvaluator, tube_iou

CATS = [Category(1, "person", True), Category(2, "car", True)]


def _rle(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_tube_iou_sums_over_frames_and_skips_frames_where_both_are_absent():
    a = np.zeros((8, 8), bool)
    a[:4, :4] = True  # 16 px
    b = np.zeros((8, 8), bool)
    b[:4, :2] = True  # 8 px inside a
    # frame 0: inter 8, union 16; frame 1: only gt (16 px) -> union += 16; frame 2: both absent.
    iou = tube_iou([_rle(b), None, None], [_rle(a), _rle(a), None])
    assert iou == pytest.approx(8 / 32)
    assert tube_iou([None], [None]) == 0.0
    with pytest.raises(ValueError, match="tubes have 2 and 1 frames"):
        tube_iou([None, None], [None])


def _video():
    masks = np.zeros((2, 3, 16, 16), bool)
    masks[0, :, :8, :8] = True
    masks[1, :2, 8:, 8:] = True  # absent in the last frame
    return masks


def test_perfect_empty_and_identity_switch():
    gt = _video()
    perfect = VideoInstanceEvaluator(CATS)
    perfect.add(1, gt, [1, 2], [False, False], gt, [1, 2], [0.9, 0.8])
    out = perfect.compute()
    assert out["AP"] == pytest.approx(100) and out["AR1"] == pytest.approx(100)
    empty = VideoInstanceEvaluator(CATS)
    empty.add(1, gt, [1, 2], [False, False], np.zeros((0, 3, 16, 16), bool), [], [])
    assert empty.compute()["AP"] == 0
    # The person's tube is right for 1 of 3 frames only: tube IoU 1/3 < 0.5 -> not matched.
    switched = gt.copy()
    switched[0, 1:] = False
    partial = VideoInstanceEvaluator(CATS)
    partial.add(1, gt, [1, 2], [False, False], switched, [1, 2], [0.9, 0.8])
    result = partial.compute()
    assert result["AP50"] == pytest.approx(100 * (0 + 1) / 2)


def test_merge_and_errors():
    gt = _video()
    a, b, whole = VideoInstanceEvaluator(CATS), VideoInstanceEvaluator(CATS), VideoInstanceEvaluator(CATS)
    for ev, vid in ((a, 1), (b, 2), (whole, 1), (whole, 2)):
        ev.add(vid, gt, [1, 2], [False, False], gt[:1], [1], [0.5])
    assert a.merge(b).compute() == whole.compute()
    with pytest.raises(ValueError, match=r"v9: predicted tubes are \(2, 16, 16\), ground truth \(3, 16, 16\)"):
        VideoInstanceEvaluator(CATS).add(1, gt, [1, 2], [False, False], gt[:, :2], [1, 2], [0.5, 0.5], where="v9")


def test_reads_the_youtube_vis_format(tmp_path):
    import json

    from omgseg.datasets.synth import SynthSizes, write_synthetic
    from omgseg.platform.evaluation.metrics.video_instance import evaluate_ytvis

    sizes = SynthSizes(coco_train=1, coco_val=1, ade_train=1, ade_val=1, video_train=1, video_val=2)
    src = write_synthetic(tmp_path / "synth", ["ytvis"], seed=0, sizes=sizes)["ytvis"]
    gt = json.loads((src / "valid.json").read_text())
    results = [{"video_id": a["video_id"], "category_id": a["category_id"], "segmentations": a["segmentations"],
                "score": 0.9} for a in gt["annotations"] if not a.get("iscrowd")]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert evaluate_ytvis(src / "valid.json", tmp_path / "results.json")["AP"] == pytest.approx(100)
    results[0]["segmentations"] = results[0]["segmentations"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="short.json result 0: .* frames, video"):
        evaluate_ytvis(src / "valid.json", tmp_path / "short.json")
