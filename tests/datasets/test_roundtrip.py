"""synth -> convert -> shards -> stream keeps every mask pixel, segment attribute and image
byte of every format, checked against what the format reader sees in the source."""

import json

import numpy as np
import pytest

from omgseg.datasets.convert import convert
from omgseg.datasets.formats import FORMATS, get_format
from omgseg.datasets.manifest import read_manifest, read_meta
from omgseg.datasets.shard_check import verify_shards
from omgseg.datasets.shard_reader import read_shard_samples
from omgseg.datasets.stream import ShardStream
from omgseg.datasets.synth import SYNTH_FORMATS, write_synthetic
from omgseg.platform.cli import main as omgseg

VIDEO_FORMATS = {"vipseg", "ytvis", "davis"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synth"), seed=0)


def test_synth_covers_every_registered_format():
    assert set(SYNTH_FORMATS) == set(FORMATS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("split", ["train", "val"])
def test_roundtrip_is_exact(fmt, split, synthetic, tmp_path):
    clip_length = 3 if fmt in VIDEO_FORMATS else None
    src = synthetic[fmt]
    source_clips = list(get_format(fmt).clips(src, split, clip_length))
    assert source_clips, f"synthetic {fmt} {split} has no clips"

    manifest = convert(fmt, src, tmp_path, split, samples_per_shard=5, clip_length=clip_length)
    assert manifest.total_samples == len(source_clips)
    assert verify_shards(tmp_path) == []
    meta = read_meta(tmp_path)
    assert [c.to_json() for c in meta.categories] == [c.to_json() for c in get_format(fmt).categories(src, split)]

    samples = list(ShardStream(tmp_path))
    assert len(samples) == len(source_clips)
    by_source = {s.source_id: s for s in samples}
    assert len(by_source) == len(samples), "source ids must be unique within a split"
    for clip in source_clips:
        sample = by_source[clip.source_id]
        np.testing.assert_array_equal(sample.id_maps.numpy(), clip.id_maps.astype(np.int64))
        assert list(sample.segments) == list(clip.segments)
        assert sample.frame_names == clip.frame_names
        assert sample.tasks == clip.tasks
        assert sample.dataset == clip.dataset
        assert sample.extra == clip.extra

    # Frame bytes are the source's, never re-encoded.
    stored = {}
    for info in manifest.shards:
        for raw in read_shard_samples(tmp_path / info.name):
            header = json.loads(raw["json"])
            stored[header["source_id"]] = [raw[f"f{t:03d}.{source_clips[0].image_ext}"] for t in range(header["frames"])]
    for clip in source_clips:
        assert stored[clip.source_id] == clip.images


def test_cli_synth_convert_verify_stats(tmp_path, capsys):
    assert omgseg(["synth", "--out", str(tmp_path / "src"), "--formats", "coco-panoptic", "--seed", "1"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "shards"
    assert omgseg(["convert", "coco-panoptic", "--src", written["coco-panoptic"], "--out", str(out), "--split", "val"]) == 0
    capsys.readouterr()
    assert omgseg(["shards", "verify", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert omgseg(["shards", "stats", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == read_manifest(out).total_samples

    # A changed byte is found, and the command fails.
    shard = sorted(out.glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert omgseg(["shards", "verify", str(out)]) == 1
    assert shard.name in capsys.readouterr().err


def test_cli_bad_input_names_the_problem(tmp_path, capsys):
    assert omgseg(["convert", "ytvis", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        omgseg(["convert", "kitti", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "coco-panoptic" in capsys.readouterr().err  # argparse lists the valid choices
    assert omgseg(["synth", "--out", str(tmp_path / "s"), "--formats", "kitti"]) == 1
    assert "kitti" in capsys.readouterr().err
    assert omgseg(["shards", "verify", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
