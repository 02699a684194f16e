"""The HTTP shard server failing while the training stream reads it: transfers cut halfway
and the server back (the stream reads the shard again and goes on at the sample it had
reached: every sample exactly as from the folder), or gone for good (once the retries are
spent, one line naming the shard's URL); a shard whose bytes differ is not read again."""

from pathlib import Path

import pytest
from localserver import ShardServer
from toydata import SOURCE, TOY_META, tiny_clip

from omgseg.datasets.manifest import ShardReadError
from omgseg.datasets.shard_writer import write_shards
from omgseg.datasets.stream import ShardStream

CONFIG = Path(__file__).resolve().parents[2] / "studies" / "configs" / "train_tiny.yaml"


@pytest.fixture
def served(tmp_path):
    """6 shards of 2 samples under <root>/toy/train, and a server for <root>."""
    write_shards([tiny_clip(i) for i in range(12)], tmp_path / "toy" / "train", meta=TOY_META, source=SOURCE,
                 samples_per_shard=2)
    server = ShardServer(tmp_path)
    yield tmp_path, server
    server.stop()


def _read(stream: ShardStream) -> tuple[list[str], Exception | None]:
    keys = []
    try:
        for sample in stream:
            keys.append(sample.key)
    except Exception as exn:  # noqa: BLE001 - the test inspects what the reader raised
        return keys, exn
    return keys, None


def test_server_gone_mid_epoch_names_the_shard_url_once_the_retries_are_spent(served, capsys):
    root, server = served
    stream = ShardStream(f"{server.url}/toy/train", retries=2, retry_backoff=0.01)
    server.cut_next(3, then_stop=True)  # the third shard's transfer stops halfway, then no server
    keys, error = _read(stream)
    assert keys[:4] == [f"{i:09d}" for i in range(4)] and len(keys) <= 6
    assert isinstance(error, ShardReadError), repr(error)
    message = str(error)
    assert "\n" not in message and f"{server.url}/toy/train/shard-000002.tar" in message, message
    assert capsys.readouterr().err.count("shard-000002.tar again") == 2  # retry 1 of 2, retry 2 of 2


def _local(root):
    return [(s.key, s.images.numpy().tobytes(), s.id_maps.numpy().tobytes()) for s in ShardStream(root / "toy" / "train")]


def test_cut_transfers_are_read_again_and_the_stream_goes_on_where_it_was(served):
    root, server = served
    local = _local(root)
    server.cut_next(2)  # the second shard's transfer is cut; the server stays up (a restart)
    stream = ShardStream(f"{server.url}/toy/train", retries=1, retry_backoff=0.01)
    got = []
    for sample in stream:
        got.append((sample.key, sample.images.numpy().tobytes(), sample.id_maps.numpy().tobytes()))
        if len(got) == 5:
            server.cut_next(1)  # and the fourth's, read next
    assert got == local and len(server.cuts) == 2


def test_without_retries_a_cut_transfer_fails_and_a_new_stream_reads_every_sample(served):
    root, server = served
    server.cut_next(2)
    keys, error = _read(ShardStream(f"{server.url}/toy/train", retries=0))
    assert isinstance(error, ShardReadError) and "shard-000001.tar" in str(error), repr(error)
    retried = [(s.key, s.images.numpy().tobytes(), s.id_maps.numpy().tobytes()) for s in ShardStream(f"{server.url}/toy/train")]
    assert retried == _local(root) and len(server.cuts) == 1


def test_a_shard_whose_bytes_differ_is_not_read_again(served, capsys):
    root, server = served
    path = root / "toy" / "train" / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # in the end-of-archive padding: the samples read well, the sha256 does not match
    path.write_bytes(bytes(data))
    keys, error = _read(ShardStream(f"{server.url}/toy/train", retries=3, retry_backoff=0.01))
    assert isinstance(error, ShardReadError) and "sha256 differs" in str(error) and "shard-000001.tar" in str(error)
    assert keys == [f"{i:09d}" for i in range(4)] and "again" not in capsys.readouterr().err


def test_a_runs_batches_are_those_of_an_uninterrupted_run_when_transfers_are_cut(study_data_root):
    """Training batches (clips made by a loader process) of data sets served over HTTP, with
    transfers cut at the start and in mid-epoch, equal those read from the folders."""
    import torch

    from omgseg.platform.config import TrainConfig, load_config
    from omgseg.platform.data import prepare_data
    from omgseg.platform.training.loop import build_parts

    def config(*overrides):
        return load_config(TrainConfig, CONFIG, [
            f"data.root={study_data_root}", "mix={coco: 1, davis: 1}", "resources.workers=1", "evaluation={}",
            "batch.loader_workers=1", "batch.shuffle_buffer=4", "data.read_retry_backoff=0.01", *overrides])

    local = config()
    prepare_data(local.data)
    server = ShardServer(study_data_root / "shards")
    try:
        served = config(*(f"data.datasets.{n}.shards={server.url}/{n}/{{split}}" for n in ("coco", "davis")))
        expected, _ = build_parts(local, 0, 1, torch.device("cpu"))
        parts, _ = build_parts(served, 0, 1, torch.device("cpu"))
        server.cut_next(1)  # the first shard read
        batches = []
        while len(batches) < 6 or (len(server.cuts) < 2 and len(batches) < 40):
            if len(batches) == 6:
                server.cut_next(1)  # the next one read, in mid-epoch
            batches.append(next(parts.batches))
        assert len(server.cuts) == 2, f"{len(batches)} batches read with one cut transfer"
        for step, batch in enumerate(batches):
            other = next(expected.batches)
            assert batch.datasets == other.datasets and torch.equal(batch.images, other.images), step
            assert all(torch.equal(a.masks, b.masks) and a.seed == b.seed for a, b in zip(batch.targets, other.targets))
        parts.batches.close()
        expected.batches.close()
    finally:
        server.stop()


def test_validation_reads_retry_a_cut_transfer(served):
    """The val split (`ValClips`) reads through the same retrying shard read as training."""
    from omgseg.platform.evaluation.evaluate import ValClips

    root, server = served
    local = [(i, s.key, s.images.numpy().tobytes()) for i, s in ValClips(root / "toy" / "train").read()]
    server.cut_next(2)  # the second shard's transfer is cut, then read again (after the default 1 s)
    remote = [(i, s.key, s.images.numpy().tobytes()) for i, s in ValClips(f"{server.url}/toy/train").read()]
    assert remote == local and len(local) == 12 and len(server.cuts) == 1
