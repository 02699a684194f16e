"""The HTTP shard server failing while the training stream reads it: a transfer cut halfway,
then the server gone (the stream stops with one line naming the shard's URL), or back (a new
stream, as a retried trial opens, reads every sample exactly as from the folder)."""

import pytest
from localserver import ShardServer
from toydata import SOURCE, TOY_META, tiny_clip

from omgseg.datasets.manifest import ShardReadError
from omgseg.datasets.shard_writer import write_shards
from omgseg.datasets.stream import ShardStream


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


def test_server_gone_mid_epoch_names_the_shard_url(served):
    root, server = served
    stream = ShardStream(f"{server.url}/toy/train")
    server.cut_next(3, then_stop=True)  # the third shard's transfer stops halfway, then no server
    keys, error = _read(stream)
    assert keys[:4] == [f"{i:09d}" for i in range(4)] and len(keys) <= 6
    assert isinstance(error, ShardReadError), repr(error)
    message = str(error)
    assert "\n" not in message and f"{server.url}/toy/train/shard-000002.tar" in message, message


def test_server_back_a_new_stream_reads_every_sample(served):
    root, server = served
    local = [(s.key, s.images.numpy().tobytes(), s.id_maps.numpy().tobytes()) for s in ShardStream(root / "toy" / "train")]
    server.cut_next(2)  # one cut transfer; the server stays up (a restart between tries)
    keys, error = _read(ShardStream(f"{server.url}/toy/train"))
    assert isinstance(error, ShardReadError) and "shard-000001.tar" in str(error), repr(error)
    retried = [(s.key, s.images.numpy().tobytes(), s.id_maps.numpy().tobytes()) for s in ShardStream(f"{server.url}/toy/train")]
    assert retried == local and len(server.cuts) == 1
