"""Shard locations: local folders, http:// URLs (a real server on loopback), brace patterns;
and the training split: disjoint parts per epoch across ranks."""

import functools
import http.server
import threading

import pytest
from toydata import SOURCE, TOY_META, tiny_clip

from omgseg.datasets.location import MissingExtra, ShardLocation
from omgseg.datasets.manifest import read_manifest, read_meta
from omgseg.datasets.shard_writer import write_shards
from omgseg.datasets.stream import ShardStream


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards of 2 samples under <root>/toy/train."""
    root = tmp_path_factory.mktemp("served")
    write_shards([tiny_clip(i) for i in range(12)], root / "toy" / "train", meta=TOY_META, source=SOURCE,
                 samples_per_shard=2)
    return root


@pytest.fixture(scope="module")
def server(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.func.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _keys(stream):
    return [s.key for s in stream]


def test_parse():
    assert ShardLocation.parse("/data/coco/train") == ShardLocation("/data/coco/train")
    assert ShardLocation.parse("https://h/coco/train/") == ShardLocation("https://h/coco/train")
    pattern = ShardLocation.parse("s3://b/coco/train/shard-{000000..000002}.tar")
    assert pattern == ShardLocation("s3://b/coco/train", "shard-{000000..000002}.tar") and pattern.remote
    assert pattern.names() == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert pattern.url("manifest.json") == "s3://b/coco/train/manifest.json"


def test_http_reads_the_same_samples_as_the_folder(shards, server):
    local = ShardStream(shards / "toy" / "train")
    remote = ShardStream(f"{server}/toy/train")
    assert remote.manifest == local.manifest and remote.meta == local.meta
    assert _keys(remote) == _keys(local) == [f"{i:09d}" for i in range(12)]
    first = next(iter(remote))
    assert first.shard == f"{server}/toy/train/shard-000000.tar"
    assert (first.images == next(iter(local)).images).all()


def test_brace_patterns_select_shards_locally_and_over_http(shards, server):
    for base in (str(shards / "toy" / "train"), f"{server}/toy/train"):
        stream = ShardStream(f"{base}/shard-{{000001..000002}}.tar")
        assert _keys(stream) == [f"{i:09d}" for i in (2, 3, 4, 5)]
    with pytest.raises(ValueError, match=r"names shards that manifest.json does not list: \['shard-000006.tar'\]"):
        ShardStream(f"{server}/toy/train/shard-{{000005..000006}}.tar")


def test_missing_remote_files_are_named(shards, server):
    with pytest.raises(FileNotFoundError, match=r"/nowhere/manifest.json: no manifest"):
        read_manifest(f"{server}/nowhere")
    assert read_meta(f"{server}/toy/train").dataset == "toy"
    (shards / "gone").mkdir()
    for name in ("manifest.json", "meta.json"):
        (shards / "gone" / name).write_bytes((shards / "toy" / "train" / name).read_bytes())
    stream = ShardStream(f"{server}/gone")  # remote: shards are checked when read
    with pytest.raises(Exception, match=r"gone/shard-000000.tar"):
        next(iter(stream))


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_training_parts_are_disjoint_in_every_epoch(shards, monkeypatch):
    reads, keys = [], []
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        stream = ShardStream(shards / "toy" / "train", repeat=True, epoch_samples=12, seed=4)
        keys.append(_keys(stream))  # 12 samples = 2 epochs of this rank's 3 shards
        reads.append(stream.reads)
    assert sorted(reads[0]) == sorted(reads[1]) == [0, 1]
    for epoch in (0, 1):
        mine, theirs = set(reads[0][epoch]), set(reads[1][epoch])
        assert len(mine) == len(theirs) == 3 and not mine & theirs  # disjoint, and together all 6
    assert reads[0][0] != reads[0][1] or reads[1][0] != reads[1][1]  # reshuffled each epoch
    assert not set(keys[0][:6]) & set(keys[1][:6])  # the first epoch's samples are disjoint too


def test_fewer_shards_than_parts_split_the_samples(shards, monkeypatch):
    keys = []
    for rank in range(8):  # 8 ranks, 6 shards
        _as_rank(monkeypatch, rank, 8)
        stream = ShardStream(shards / "toy" / "train", repeat=True, epoch_samples=1, seed=0)
        keys.append(_keys(stream))
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == 8  # every rank its own sample


@pytest.mark.parametrize(("url", "backend", "extra"), [("s3://bucket/coco/val", "s3fs", "s3"),
                                                        ("gs://bucket/coco/val", "gcsfs", "gcs")])
def test_an_object_store_without_its_backend_names_the_extra_to_install(url, backend, extra, monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed (importing it fails)
    monkeypatch.setattr(importlib.import_module("fsspec.registry"), "registry", {})  # nor imported before
    with pytest.raises(MissingExtra) as err:
        read_manifest(url)
    assert str(err.value) == f"{url}/manifest.json: reading {url[:2]}:// needs {backend}: pip install 'omgseg[{extra}]'"


def test_an_s3_location_reads_as_the_folder(shards, monkeypatch):
    """Through s3fs (the `s3` extra) against a local S3 (moto's server on loopback)."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from localserver import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="shards")
        for path in (shards / "toy" / "train").iterdir():
            client.upload_file(str(path), "shards", f"toy/train/{path.name}")
        assert read_manifest("s3://shards/toy/train") == read_manifest(shards / "toy" / "train")
        assert _keys(ShardStream("s3://shards/toy/train")) == _keys(ShardStream(shards / "toy" / "train"))
        assert _keys(ShardStream("s3://shards/toy/train/shard-{000001..000002}.tar")) == [f"{i:09d}" for i in (2, 3, 4, 5)]
    finally:
        server.stop()
