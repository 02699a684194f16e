"""`omgseg convert`: shards written in parallel are the bytes of one process, an interrupted
parallel conversion resumes, and a held-out part of train is the val split."""

import json
import random
from dataclasses import replace

import pytest

from omgseg.datasets.convert import convert
from omgseg.datasets.heldout import HeldOut
from omgseg.datasets.manifest import MANIFEST, PARTIAL_MANIFEST, read_manifest, read_meta
from omgseg.datasets.shard_check import verify_shards
from omgseg.datasets.stream import ShardStream
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.platform.cli import main as omgseg

SIZES = SynthSizes(coco_train=14, coco_val=1, ade_train=1, ade_val=1, video_train=6, video_val=1,
                   min_frames=5, max_frames=7)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synth"), formats=["coco-panoptic", "ytvis"], seed=0, sizes=SIZES)


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != MANIFEST}


def _without_created(folder):
    return replace(read_manifest(folder), created="").to_json()


@pytest.mark.parametrize(("fmt", "clip_length"), [("coco-panoptic", None), ("ytvis", 3)])
def test_any_number_of_workers_writes_the_same_bytes(fmt, clip_length, synthetic, tmp_path):
    for workers in (1, 2, 3):
        convert(fmt, synthetic[fmt], tmp_path / f"w{workers}", "train", samples_per_shard=4, clip_length=clip_length,
                workers=workers)
    one = _folder_bytes(tmp_path / "w1")
    assert len([n for n in one if n.endswith(".tar")]) >= 3
    for workers in (2, 3):
        assert _folder_bytes(tmp_path / f"w{workers}") == one
        assert _without_created(tmp_path / f"w{workers}") == _without_created(tmp_path / "w1")
        assert verify_shards(tmp_path / f"w{workers}") == []


def test_an_interrupted_parallel_conversion_resumes_atomic_per_shard(synthetic, tmp_path):
    src = synthetic["coco-panoptic"]
    convert("coco-panoptic", src, tmp_path / "whole", "train", samples_per_shard=3, workers=1)
    # The 8th image (of shard 2) cannot be read: that shard fails, the others finish or stop.
    broken = sorted((src / "train2017").iterdir())[7]
    data = broken.read_bytes()
    broken.write_bytes(data[:40])
    out = tmp_path / "resumed"
    try:
        with pytest.raises(ValueError, match=broken.name):
            convert("coco-panoptic", src, out, "train", samples_per_shard=3, workers=2)
    finally:
        broken.write_bytes(data)
    assert not list(out.glob("*.tmp")) and not (out / MANIFEST).exists()
    partial = json.loads((out / PARTIAL_MANIFEST).read_text())
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in partial["shards"]}
    # A shard a worker finished after the failure arrived may be on disk unrecorded: resuming removes it.
    assert kept and "shard-000002.tar" not in kept and set(kept) <= {p.name for p in out.glob("*.tar")}

    convert("coco-panoptic", src, out, "train", samples_per_shard=3, workers=2)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # finished shards were not rewritten
    assert _folder_bytes(out) == _folder_bytes(tmp_path / "whole")
    assert _without_created(out) == _without_created(tmp_path / "whole")


def test_held_out_videos_are_the_val_split_and_never_in_train(synthetic, tmp_path):
    src = synthetic["ytvis"]
    rule = HeldOut(count=2)
    for split in ("train", "val"):
        convert("ytvis", src, tmp_path / split, split, samples_per_shard=4, clip_length=3, heldout=rule, workers=2)
    train, val = read_manifest(tmp_path / "train"), read_manifest(tmp_path / "val")
    assert train.heldout.side == "train" and val.heldout.side == "val"
    assert train.heldout.items == val.heldout.items and len(val.heldout.items) == 2
    assert val.source["split"] == "train" and read_meta(tmp_path / "val").split == "val"

    def videos(folder):
        return {sample.source_id.split("@")[0] for sample in ShardStream(folder)}

    assert videos(tmp_path / "val") == set(val.heldout.items)
    assert videos(tmp_path / "train").isdisjoint(videos(tmp_path / "val"))
    assert videos(tmp_path / "train") | videos(tmp_path / "val") == {str(i) for i in range(1, SIZES.video_train + 1)}
    # Every clip of a held-out video is in val: the clips of the whole split are shared out.
    whole = convert("ytvis", src, tmp_path / "whole", "train", samples_per_shard=4, clip_length=3)
    assert train.total_samples + val.total_samples == whole.total_samples

    # The same rule gives the same part, and another rule rebuilds the folder.
    again = convert("ytvis", src, tmp_path / "val", "val", samples_per_shard=4, clip_length=3, heldout=rule)
    assert again == val
    other = convert("ytvis", src, tmp_path / "val", "val", samples_per_shard=4, clip_length=3,
                    heldout=HeldOut(fraction=0.5))
    assert len(other.heldout.items) == 3 and verify_shards(tmp_path / "val") == []


def test_held_out_ids_do_not_depend_on_their_order():
    items = [f"video{i}" for i in range(50)]
    chosen = HeldOut(fraction=0.2).select(items, "here")
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert set(HeldOut(fraction=0.2).select(shuffled, "here")) == set(chosen) and len(chosen) == 10
    assert list(chosen) == [i for i in items if i in set(chosen)]  # in the source's order
    # More videos in the source: a held-out count never brings an old video into val, only new ones.
    grown = HeldOut(count=10).select([*items, *(f"new{i}" for i in range(20))], "here")
    assert {i for i in grown if i in set(items)} <= set(chosen)
    assert len(HeldOut(fraction=0.01).select(items, "here")) == 1  # a fraction holds out at least one


def test_held_out_errors_name_the_source_and_the_rule():
    with pytest.raises(ValueError, match="a fraction or a count"):
        HeldOut()
    with pytest.raises(ValueError, match="between 0 and 1"):
        HeldOut(fraction=1.5)
    with pytest.raises(ValueError, match=r"/data/x: holding out count 3 of its 3 images or videos leaves none"):
        HeldOut(count=3).select(["a", "b", "c"], "/data/x")


def test_the_command_takes_workers_and_a_held_out_part(synthetic, tmp_path, capsys):
    args = ["convert", "ytvis", "--src", str(synthetic["ytvis"]), "--out", str(tmp_path / "val"), "--split", "val",
            "--clip-length", "3", "--workers", "2"]
    assert omgseg([*args, "--val-from-train", "0.5"]) == 0
    manifest = read_manifest(tmp_path / "val")
    assert manifest.heldout.rule == HeldOut(fraction=0.5) and len(manifest.heldout.items) == SIZES.video_train // 2
    assert omgseg([*args, "--val-from-train", "2"]) == 0
    assert read_manifest(tmp_path / "val").heldout.rule == HeldOut(count=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        omgseg([*args, "--val-from-train", "1.5"])
    assert err.value.code == 2 and "a fraction between 0 and 1 or a whole count, got '1.5'" in capsys.readouterr().err
