"""DAVIS J and F by hand: empty masks, boundary tolerance, frames scored, statistics, files."""

import math

import numpy as np
import pytest
from PIL import Image

from omgseg.platform.evaluation.metrics.vos import VOSEvaluator, boundary_map, evaluate_davis, f_measure, j_measure


def test_j_and_f_on_empty_and_identical_masks():
    empty = np.zeros((10, 10), bool)
    square = empty.copy()
    square[2:6, 2:6] = True
    assert j_measure(empty, empty) == 1.0 and f_measure(empty, empty) == 1.0
    assert j_measure(square, empty) == 0.0 and f_measure(empty, square) == 0.0
    assert j_measure(square, square) == 1.0 and f_measure(square, square) == 1.0


def test_boundary_tolerance_is_a_fraction_of_the_diagonal():
    # 100x100: diagonal 141.4 -> radius ceil(1.13) = 2 px. A square shifted by 2 px keeps
    # F = 1; shifted by 4 px, the shifted edges fall outside the tolerance.
    gt = np.zeros((100, 100), bool)
    gt[20:60, 20:60] = True
    near = np.roll(gt, 2, axis=1)
    far = np.roll(gt, 4, axis=1)
    assert f_measure(near, gt) == pytest.approx(1.0)
    assert f_measure(far, gt) < 1.0
    assert j_measure(near, gt) == pytest.approx(38 * 40 / (42 * 40))
    assert boundary_map(gt).sum() > 0


def test_first_and_last_frames_are_not_scored_and_statistics():
    gt = np.zeros((1, 6, 10, 10), bool)
    gt[0, :, 2:6, 2:6] = True
    pred = gt.copy()
    pred[0, 0] = False  # frame 0 wrong: not scored
    pred[0, 5] = False  # last frame wrong: not scored
    pred[0, 4] = False  # frame 4 wrong: J 0
    ev = VOSEvaluator()
    ev.add("seq", gt, pred)
    out = ev.compute()
    # scored frames 1..4: J = [1, 1, 1, 0] -> mean 0.75, recall 0.75. Decay uses DAVIS's
    # overlapping quarter bins: edges round(linspace(1, 4, 5)) - 1 = [0, 1, 1, 2, 3], bins
    # J[0:2] = [1, 1] and J[2:4] = [1, 0]: decay 1 - 0.5.
    assert out["J-Mean"] == pytest.approx(75) and out["J-Recall"] == pytest.approx(75)
    assert out["J-Decay"] == pytest.approx(50)
    assert out["J&F"] == pytest.approx((out["J-Mean"] + out["F-Mean"]) / 2)
    with pytest.raises(ValueError, match="seq2: need equal"):
        ev.add("seq2", gt, pred[:, :3])


def test_davis_folders(tmp_path):
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for who in ("gt", "pred"):
        (tmp_path / who / "bear").mkdir(parents=True)
        for t in range(4):
            frame = np.zeros((20, 20), np.uint8)
            frame[2:8, 2:8] = 1
            frame[10:18, 10:18] = 2 if (who == "gt" or t < 2) else 0
            image = Image.fromarray(frame, mode="P")
            image.putpalette(palette)
            image.save(tmp_path / who / "bear" / f"{t:05d}.png")
    out = evaluate_davis(tmp_path / "gt", tmp_path / "pred")
    assert out["objects"] == 2
    # object 1 perfect; object 2 lost in frames 2, 3 -> scored frames 1, 2: J = [1, 0].
    assert out["J-Mean"] == pytest.approx((100 + 50) / 2)
    (tmp_path / "pred" / "bear" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match="pred/bear/00003.png does not exist"):
        evaluate_davis(tmp_path / "gt", tmp_path / "pred")
    assert not math.isnan(out["F-Mean"])


def test_eval_command_for_davis(tmp_path, capsys):
    import json

    from omgseg.platform.cli import main

    for who in ("gt", "pred"):
        (tmp_path / who / "dog").mkdir(parents=True)
        for t in range(3):
            frame = np.zeros((12, 12), np.uint8)
            frame[2:8, 2:8] = 1
            Image.fromarray(frame, mode="P").save(tmp_path / who / "dog" / f"{t:05d}.png")
    assert main(["eval", "davis", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["J&F"] == pytest.approx(100)
    assert main(["eval", "davis", "--gt-dir", str(tmp_path / "nowhere"), "--pred-dir", str(tmp_path)]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
