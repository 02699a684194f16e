"""Shard streams: rank/worker splits, equal per-rank counts, seeding, and errors that name
the shard and the sample."""

import itertools
import json
import random
import tarfile

import pytest
import torch
import webdataset as wds
from toydata import SOURCE, TOY_META, tiny_clip

from omgseg.core.seeds import derive_seed
from omgseg.datasets.manifest import MANIFEST, ShardReadError, sha256_file
from omgseg.datasets.shard_reader import read_shard_samples
from omgseg.datasets.shard_writer import write_shards
from omgseg.datasets.stream import ClipSample, SamplePosition, ShardStream, StreamPosition, decode_sample


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """5 shards holding 3, 3, 3, 3 and 1 samples."""
    out = tmp_path_factory.mktemp("uneven")
    write_shards([tiny_clip(i) for i in range(13)], out, meta=TOY_META, source=SOURCE, samples_per_shard=3)
    return out


def keys(samples):
    return [s.key for s in samples]


def as_rank(monkeypatch, rank: int, world_size: int) -> None:
    # What Ray Train sets, and what webdataset 1.0.2's pytorch_worker_info reads first.
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_eval_reads_every_shard_once_across_ranks(uneven, monkeypatch):
    per_rank = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        per_rank.append(keys(ShardStream(uneven)))
    assert [len(k) for k in per_rank] == [7, 6]  # shards 0, 2, 4 and 1, 3: uneven, as documented
    together = per_rank[0] + per_rank[1]
    assert sorted(together) == [f"{i:09d}" for i in range(13)]


def test_training_gives_every_rank_the_same_count_under_uneven_shards(uneven, monkeypatch):
    counts = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        stream = ShardStream(uneven, repeat=True, epoch_samples=10, shuffle_buffer=4, seed=3)
        counts.append(len(list(stream)))
    assert counts == [10, 10]


def test_two_dataloader_workers(uneven, monkeypatch):
    as_rank(monkeypatch, 1, 2)
    loader = torch.utils.data.DataLoader(ShardStream(uneven), batch_size=None, num_workers=2, collate_fn=_identity)
    got = keys(loader)
    # Rank 1 owns shards 1 and 3; its two workers take one each.
    assert sorted(got) == [f"{i:09d}" for i in (3, 4, 5, 9, 10, 11)]

    train = ShardStream(uneven, repeat=True, epoch_samples=7, seed=1)
    loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=2, collate_fn=_identity)
    assert len(list(loader)) == 7  # the rank's total, shared between its workers


def _identity(x):
    return x


def test_seeding_is_deterministic_per_seed_rank_worker_and_epoch(uneven, monkeypatch):
    def draw(seed, rank, epoch=0):
        as_rank(monkeypatch, rank, 2)
        stream = ShardStream(uneven, repeat=True, epoch_samples=12, shuffle_buffer=5, seed=seed)
        stream.set_epoch(epoch)
        return keys(stream)

    assert draw(0, 0) == draw(0, 0)
    assert draw(0, 0) != draw(0, 1)
    assert draw(0, 0) != draw(1, 0)
    assert draw(0, 0) != draw(0, 0, epoch=1)
    assert derive_seed(1, 2, 3, 4) == derive_seed(1, 2, 3, 4) != derive_seed(1, 2, 4, 3)
    assert derive_seed(1, "a") != derive_seed(1, "b") and derive_seed(7) != derive_seed("7")


def _previous_stream(folder, seed, shuffle_buffer, part, parts, epochs):
    """The training stream as it was read before positions: each epoch's part of the shuffled
    shards concatenated (every parts-th sample when there are fewer shards than parts), then
    webdataset's shuffle buffer."""
    stream = ShardStream(folder, repeat=True, seed=seed)

    def raw():
        for epoch in range(epochs):
            order = list(stream.shards)
            random.Random(derive_seed(seed, "shard-order", 0, epoch)).shuffle(order)
            if len(order) >= parts:
                for info in order[part::parts]:
                    yield from read_shard_samples(stream.location.url(info.name))
            else:
                samples = (s for info in order for s in read_shard_samples(stream.location.url(info.name)))
                yield from itertools.islice(samples, part, None, parts)

    rng = random.Random(derive_seed(seed, "shuffle", 0, part, 0))
    return [s["__key__"] for s in wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=rng)(raw())]


@pytest.mark.parametrize("buffer, parts", [(5, 1), (5, 2), (0, 2), (4, 7)])
def test_the_training_stream_is_webdatasets_shuffle_of_the_epochs_parts(uneven, buffer, parts):
    for part in range(parts):
        previous = _previous_stream(uneven, 3, buffer, part, parts, epochs=12)
        n = len(previous) - 2 * buffer  # the reference's tail empties its buffer at its (finite) end
        got = [s["__key__"] for s in itertools.islice(
            ShardStream(uneven, repeat=True, shuffle_buffer=buffer, seed=3).raw_samples(part, parts), n)]
        assert got == previous[:n]


@pytest.mark.parametrize("buffer, parts", [(5, 1), (0, 1), (4, 7)])
def test_a_stream_resumes_at_its_position_exactly(uneven, buffer, parts):
    def stream(start=None):
        return ShardStream(uneven, repeat=True, shuffle_buffer=buffer, seed=3, start=start).raw_samples(parts - 1, parts)

    whole = [s["__key__"] for s in itertools.islice(stream(), 60)]
    for cut in (1, 7, 13, 38):
        first = stream()
        keys = [s["__key__"] for s in itertools.islice(first, cut)]
        position = StreamPosition.from_json(json.loads(json.dumps(first.position.to_json())))  # as a checkpoint keeps it
        keys += [s["__key__"] for s in itertools.islice(stream(position), 60 - cut)]
        assert keys == whole, cut


def test_resuming_reads_the_same_whatever_the_position(uneven, monkeypatch):
    """The samples read to resume (the shard of the next sample, up to it, and the buffered
    samples' shards) do not grow with the samples read before."""
    import omgseg.datasets.stream as stream_module

    reads = []

    def counting(path, expected=None):
        for sample in read_shard_samples(path, expected=expected):
            reads.append(1)
            yield sample

    def resume_cost(after):
        first = ShardStream(uneven, repeat=True, shuffle_buffer=3, seed=3).raw_samples()
        list(itertools.islice(first, after))
        monkeypatch.setattr(stream_module, "read_shard_samples", counting)
        reads.clear()
        next(ShardStream(uneven, repeat=True, shuffle_buffer=3, seed=3, start=first.position).raw_samples())
        monkeypatch.undo()
        return len(reads)

    costs = [resume_cost(after) for after in (20, 200, 2000)]
    assert max(costs) <= 3 * 4  # the 3 buffered samples' shards and the next one's, 3 samples each at most
    with pytest.raises(ValueError, match="part 0 of 1, this stream reads part 1 of 2"):
        ShardStream(uneven, repeat=True, start=StreamPosition(0, 1, SamplePosition(0, 0, 0))).raw_samples(1, 2)


def test_eval_shuffle_still_reads_each_sample_once(uneven, monkeypatch):
    as_rank(monkeypatch, 0, 1)
    got = keys(ShardStream(uneven, shuffle_buffer=8, seed=5))
    assert sorted(got) == [f"{i:09d}" for i in range(13)] and got != sorted(got)


def test_decoded_sample_types(uneven):
    sample = next(iter(ShardStream(uneven)))
    assert isinstance(sample, ClipSample)
    assert sample.images.dtype == torch.uint8 and sample.images.shape == (1, 3, 8, 8)
    assert sample.id_maps.dtype == torch.int64 and int(sample.id_maps.max()) == 1
    assert sample.shard.endswith("shard-000000.tar") and sample.dataset == "toy"


def test_bad_arguments_and_missing_manifest(uneven, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardStream(tmp_path)
    with pytest.raises(ValueError, match="epoch_samples needs repeat=True"):
        ShardStream(uneven, epoch_samples=5)


# --- corrupt data: every error names the shard file and the sample key ---------------


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _refresh_manifest(folder, name):
    """Make the manifest agree with a rewritten shard, so the reader sees the bad content."""
    doc = json.loads((folder / MANIFEST).read_text())
    for entry in doc["shards"]:
        if entry["name"] == name:
            entry["bytes"] = (folder / name).stat().st_size
            entry["sha256"] = sha256_file(folder / name)
    (folder / MANIFEST).write_text(json.dumps(doc))


def _rewrite_member(folder, name, member, data):
    path = folder / name
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as writer:
        by_key: dict = {}
        for m, content in members:
            key, field = m.name.split(".", 1)
            by_key.setdefault(key, {"__key__": key})[field] = data if m.name == member else content
        for sample in by_key.values():
            writer.write({k: v for k, v in sample.items() if v is not None})  # None: drop member
    _refresh_manifest(folder, name)


def test_bad_json_names_shard_and_key(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "bad")
    _rewrite_member(folder, "shard-000001.tar", "000000004.json", b"{not json")
    with pytest.raises(ShardReadError, match=r"shard-000001\.tar, sample 000000004: json header is not valid JSON"):
        list(ShardStream(folder))


def test_sample_missing_a_field_names_shard_key_and_field(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "missing")
    header = {"dataset": "toy", "source_id": "4", "frames": 1, "frame_names": ["4.jpg"],
              "height": 8, "width": 8, "tasks": ["panoptic"]}
    _rewrite_member(folder, "shard-000001.tar", "000000004.json", json.dumps(header).encode())
    with pytest.raises(ShardReadError, match=r"shard-000001\.tar, sample 000000004: .*no 'segments' field"):
        list(ShardStream(folder))


def test_sample_missing_an_id_map_names_shard_and_key(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "nomap")
    _rewrite_member(folder, "shard-000001.tar", "000000005.f000.seg.png", None)
    with pytest.raises(ShardReadError, match=r"shard-000001\.tar, sample 000000005: no id map for frame 0"):
        list(ShardStream(folder))


def test_truncated_shard_names_shard_and_key(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "trunc")
    path = folder / "shard-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # mid-member: the manifest still has the old size
    with pytest.raises(ShardReadError, match=r"shard-000002\.tar.*sample 00000000[678]") as info:
        list(ShardStream(folder))
    assert "shard-000002.tar" in str(info.value)


def test_truncated_at_a_member_boundary_is_caught_by_the_count(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "cut")
    path = folder / "shard-000000.tar"
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    # 3 members a sample: cut exactly before sample 2, which tarfile takes for the end.
    path.write_bytes(path.read_bytes()[: offsets[6]])
    with pytest.raises(ShardReadError, match=r"shard-000000\.tar: read 2 samples.*last sample read: 000000001"):
        list(ShardStream(folder))


def test_corrupt_tar_header_names_shard_and_key(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "corrupt")
    path = folder / "shard-000003.tar"
    with tarfile.open(path) as tar:
        third = tar.getmembers()[3]  # a header in the middle of the archive
    data = bytearray(path.read_bytes())
    data[third.offset : third.offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    _refresh_manifest(folder, "shard-000003.tar")
    with pytest.raises(ShardReadError, match=r"shard-000003\.tar.*(sample 00000001[01]|last sample read)"):
        list(ShardStream(folder))


def test_garbage_file_names_the_shard(uneven, tmp_path):
    folder = _copy(uneven, tmp_path / "garbage")
    (folder / "shard-000004.tar").write_bytes(b"this is not a tar file" * 30)
    _refresh_manifest(folder, "shard-000004.tar")
    with pytest.raises(ShardReadError, match=r"shard-000004\.tar"):
        list(ShardStream(folder))


def test_decode_sample_wraps_unexpected_errors():
    with pytest.raises(ShardReadError, match=r"shard x\.tar, sample k: no image for frame 0"):
        decode_sample({"__key__": "k", "__url__": "x.tar", "json": json.dumps(
            {"dataset": "d", "source_id": "s", "frames": 1, "frame_names": ["a"], "height": 2,
             "width": 2, "tasks": [], "segments": []}).encode(), "f000.seg.png": b""})


def test_an_unsplit_eval_stream_reads_every_shard_on_any_rank(uneven, monkeypatch):
    as_rank(monkeypatch, 1, 2)
    assert len(keys(ShardStream(uneven, split=False))) == 13  # all of them, on rank 1 of 2
    assert len(keys(ShardStream(uneven))) < 13  # the default: this rank's share
    with pytest.raises(ValueError, match="split=False is for evaluation streams"):
        ShardStream(uneven, repeat=True, split=False)
