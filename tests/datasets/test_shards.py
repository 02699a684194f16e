"""Shard writing: round trip, atomic shards, resume/restart, verify and stats."""

import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip, Segment, segment_areas
from omgseg.datasets.manifest import (
    CONVERTER_VERSION,
    MANIFEST,
    META,
    PARTIAL_MANIFEST,
    ShardMeta,
    ShardReadError,
    read_manifest,
    read_meta,
)
from omgseg.datasets.shard_check import shard_stats, verify_shards
from omgseg.datasets.shard_reader import read_shard_samples
from omgseg.datasets.shard_writer import write_shards
from omgseg.datasets.stream import ShardStream

TOY_META = ShardMeta("toy", "toy-format", "train", (Task.PANOPTIC, Task.VOS),
                     (Category(id=1, name="cat", isthing=True), Category(id=2, name="sky", isthing=False)))
SOURCE = {"format": "toy-format", "src": "/nowhere", "split": "train", "clip_length": None}


def make_clip(index: int, frames: int = 2, size: tuple[int, int] = (12, 16), ext: str = "jpg") -> Clip:
    """A small clip with random pixels, a big id (needs all 3 RGB bytes) and a stuff region."""
    rng = np.random.default_rng(index)
    h, w = size
    images = []
    for _ in range(frames):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG" if ext == "jpg" else "PNG")
        images.append(buffer.getvalue())
    ids = np.zeros((frames, h, w), dtype=np.uint32)
    big = 5_000_000 + index
    for t in range(frames):
        ids[t, : h // 2, : w // 2] = big
        ids[t, h // 2 :, :] = 7
        ids[t, 0, w - 1] = 0
    ids[-1, 1, 1] = 3  # a segment present in the last frame only
    segs = [big, 7, 3]
    areas = segment_areas(ids, segs)
    segments = [
        Segment(id=big, category_id=1, iscrowd=False, track_id=big, area=areas[big]),
        Segment(id=7, category_id=2, iscrowd=False, track_id=7, area=areas[7]),
        Segment(id=3, category_id=1, iscrowd=True, track_id=3, area=areas[3]),
    ]
    return Clip(
        dataset="toy",
        source_id=f"video{index}",
        frame_names=tuple(f"video{index}/{t:05d}.{ext}" for t in range(frames)),
        images=images,
        image_ext=ext,
        id_maps=ids,
        segments=segments,
        tasks=(Task.PANOPTIC, Task.VOS),
        extra={"overlap_pixels": index},
    )


class Interrupted(RuntimeError):
    pass


def clips_then_fail(clips, n):
    for i, clip in enumerate(clips):
        if i == n:
            raise Interrupted(f"stopped after {n} clips")
        yield clip


def test_round_trip_keeps_ids_attributes_and_jpeg_bytes(tmp_path):
    clips = [make_clip(i, ext="jpg" if i % 2 else "png") for i in range(5)]
    manifest = write_shards(clips, tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=2)
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    assert manifest.total_samples == 5 and manifest.converter_version == CONVERTER_VERSION
    assert manifest.parameters == {"samples_per_shard": 2, "clip_length": None}
    assert read_manifest(tmp_path) == manifest
    assert read_meta(tmp_path).categories[1].name == "sky"
    assert not (tmp_path / PARTIAL_MANIFEST).exists()

    raw = [s for info in manifest.shards for s in read_shard_samples(tmp_path / info.name, expected=info)]
    assert [s["__key__"] for s in raw] == [f"{i:09d}" for i in range(5)]
    for clip, sample in zip(clips, raw):
        for t in range(clip.num_frames):
            assert sample[f"f{t:03d}.{clip.image_ext}"] == clip.images[t]  # the source's bytes
        assert json.loads(sample["json"]) == clip.header()

    decoded = list(ShardStream(tmp_path))
    assert len(decoded) == 5
    for clip, sample in zip(clips, decoded):
        assert np.array_equal(sample.id_maps.numpy(), clip.id_maps.astype(np.int64))
        assert list(sample.segments) == clip.segments
        assert sample.frame_names == clip.frame_names and sample.tasks == clip.tasks
        assert sample.extra == clip.extra and sample.source_id == clip.source_id
        for t in range(clip.num_frames):
            expected = np.asarray(Image.open(io.BytesIO(clip.images[t])).convert("RGB"))
            assert np.array_equal(sample.images[t].permute(1, 2, 0).numpy(), expected)


def test_interrupted_conversion_resumes_to_the_uninterrupted_result(tmp_path):
    clips = [make_clip(i, frames=1) for i in range(7)]
    whole = write_shards(clips, tmp_path / "whole", meta=TOY_META, source=SOURCE, samples_per_shard=3)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        write_shards(clips_then_fail(clips, 4), out, meta=TOY_META, source=SOURCE, samples_per_shard=3)
    # One full shard finished; the second one was interrupted and left nothing behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([META, PARTIAL_MANIFEST, "shard-000000.tar"])
    assert not (out / MANIFEST).exists()
    assert "manifest.json" in verify_shards(out)[0]
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardStream(out)

    # A stray temporary file from a hard kill is cleaned up; the finished shard is reused.
    (out / "shard-000001.tar.tmp").write_bytes(b"half a shard")
    kept_mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    seen = []

    def counting(items):
        for c in items:
            seen.append(c.source_id)
            yield c

    resumed = write_shards(counting(clips), out, meta=TOY_META, source=SOURCE, samples_per_shard=3)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept_mtime
    # `created` is the wall-clock second of each run, and the checksum covers it.
    assert replace(resumed, created="").to_json() == replace(whole, created="").to_json()
    assert verify_shards(out) == []
    assert len(seen) == 7  # the source is read through, but the first shard is not rewritten

    # Finished with identical parameters: a no-op returning the same manifest.
    again = write_shards(iter(()), out, meta=TOY_META, source=SOURCE, samples_per_shard=3)
    assert again == resumed


def test_changed_parameters_restart_cleanly(tmp_path):
    clips = [make_clip(i, frames=1) for i in range(5)]
    with pytest.raises(Interrupted):
        write_shards(clips_then_fail(clips, 3), tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=2)
    # Other parameters: the partial shard of the first run is removed, not mixed in.
    manifest = write_shards(clips, tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=4)
    assert [s.samples for s in manifest.shards] == [4, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST, META, "shard-000000.tar", "shard-000001.tar"])
    # A finished folder for other parameters restarts too.
    manifest = write_shards(clips[:3], tmp_path, meta=TOY_META, source=SOURCE | {"split": "val"}, samples_per_shard=4)
    assert manifest.total_samples == 3 and [s.name for s in manifest.shards] == ["shard-000000.tar"]
    assert verify_shards(tmp_path) == []


def test_resume_rewrites_a_finished_shard_whose_hash_changed(tmp_path):
    clips = [make_clip(i, frames=1) for i in range(5)]
    with pytest.raises(Interrupted):
        write_shards(clips_then_fail(clips, 4), tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=2)
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = write_shards(clips, tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=2)
    assert manifest.total_samples == 5 and verify_shards(tmp_path) == []


def test_verify_detects_changed_byte_missing_and_extra_files(tmp_path):
    write_shards([make_clip(i, frames=1) for i in range(4)], tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=2)
    assert verify_shards(tmp_path) == []
    shard = tmp_path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_shards(tmp_path)
    assert any("shard-000000.tar: sha256 differs" in p for p in problems), problems

    (tmp_path / "shard-000001.tar").rename(tmp_path / "shard-000007.tar")
    problems = verify_shards(tmp_path)
    assert "shard-000001.tar: missing" in problems
    assert any("shard-000007.tar: shard file not listed" in p for p in problems)


def test_verify_counts_samples_by_reading_the_tar(tmp_path):
    manifest = write_shards([make_clip(i, frames=1) for i in range(2)], tmp_path, meta=TOY_META, source=SOURCE)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    doc["shards"][0]["samples"] = 3
    doc["total_samples"] = 3
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    problems = verify_shards(tmp_path)
    assert f"{manifest.shards[0].name}: 2 samples in the tar, manifest says 3" in problems


def test_shard_stats(tmp_path):
    write_shards([make_clip(i, frames=2) for i in range(3)], tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=2)
    stats = shard_stats(tmp_path)
    assert stats["samples"] == 3 and stats["frames"] == 6 and stats["shards"] == 2
    assert stats["tasks"] == ["panoptic", "vos"]
    assert stats["segments_per_category"] == [
        {"id": 1, "name": "cat", "segments": 6},
        {"id": 2, "name": "sky", "segments": 3},
    ]
    assert stats["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("shard-*.tar"))


def test_read_manifest_and_meta_errors_name_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    write_shards([make_clip(0, frames=1)], tmp_path, meta=TOY_META, source=SOURCE)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    del doc["shards"]
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"manifest.json: no 'shards' field"):
        read_manifest(tmp_path)
    (tmp_path / META).write_text(json.dumps({k: v for k, v in TOY_META.to_json().items() if k != "categories"}))
    with pytest.raises(ValueError, match=r"meta.json: no 'categories' field"):
        read_meta(tmp_path)
    (tmp_path / META).write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        read_meta(tmp_path)


def test_tar_members_are_adjacent_and_named_by_key_and_field(tmp_path):
    write_shards([make_clip(0, frames=2)], tmp_path, meta=TOY_META, source=SOURCE)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names == [
        "000000000.f000.jpg", "000000000.f000.seg.png", "000000000.f001.jpg",
        "000000000.f001.seg.png", "000000000.json",
    ]


def test_errors_on_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([], tmp_path, meta=TOY_META, source=SOURCE, samples_per_shard=0)
    with pytest.raises(ValueError, match="no clips"):
        write_shards([], tmp_path, meta=TOY_META, source=SOURCE)
    with pytest.raises(ShardReadError, match="does not exist"):
        list(read_shard_samples(tmp_path / "nope.tar"))
