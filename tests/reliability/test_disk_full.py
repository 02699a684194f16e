"""The disk filling up while shards, manifests, eval results and checkpoints are written
(OSError ENOSPC raised mid-write): what was complete before survives, the error is one line
naming the file, and the next run finishes the job."""

import errno
import json
import shutil

import pytest
import torch
from reliability.faults import assert_one_line_error, run_cli

from omgseg.datasets import shard_writer
from omgseg.datasets.manifest import MANIFEST, PARTIAL_MANIFEST, read_manifest, sha256_file
from omgseg.datasets.shard_check import verify_shards


def _full_disk_after(monkeypatch, cls, attribute: str, limit: int, when=lambda self: True) -> None:
    """`cls.attribute` (a write method) raises ENOSPC once `limit` bytes went through it, for
    the objects `when` picks."""
    original = getattr(cls, attribute)
    written: dict[int, int] = {}

    def write(self, data):
        if when(self):
            written[id(self)] = written.get(id(self), 0) + memoryview(data).nbytes
            if written[id(self)] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(cls, attribute, write)


def _convert(src, out):
    # One process, so the shards before the one that fills the disk are all finished (test_convert.py
    # interrupts a parallel conversion).
    return run_cli(["convert", "coco-panoptic", "--src", src, "--out", out, "--samples-per-shard", "1", "--workers", "1"])


def test_disk_full_while_writing_a_shard_keeps_the_shards_before(sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _full_disk_after(patch, shard_writer._HashingFile, "write", 2000, lambda self: "shard-000001" in self.raw.name)
        outcome = _convert(sources["coco-panoptic"], out)
    assert_one_line_error(outcome, "convert", ["shard-000001.tar"], "ENOSPC in shard 1")
    assert "No space left on device" in outcome.error_line
    partial = json.loads((out / PARTIAL_MANIFEST).read_text())
    assert [s["name"] for s in partial["shards"]] == ["shard-000000.tar"]
    assert sha256_file(out / "shard-000000.tar") == partial["shards"][0]["sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.partial.json", "meta.json", "shard-000000.tar"]
    # Space freed: the same command resumes and ends as an uninterrupted conversion does.
    assert _convert(sources["coco-panoptic"], out).code == 0
    clean = tmp_path / "clean"
    assert _convert(sources["coco-panoptic"], clean).code == 0
    assert read_manifest(out).shards == read_manifest(clean).shards and verify_shards(out) == []


def _full_disk_in_json_dump(patch, name: str) -> None:
    """json.dump into `<name>.tmp` writes a few bytes, then the disk is full."""
    original = json.dump

    def dump(obj, f, **kwargs):
        if getattr(f, "name", "").endswith(name + ".tmp"):
            f.write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, **kwargs)

    patch.setattr(json, "dump", dump)


def test_disk_full_while_writing_the_manifest_leaves_no_finished_manifest(sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _full_disk_in_json_dump(patch, MANIFEST)
        outcome = _convert(sources["coco-panoptic"], out)
    assert_one_line_error(outcome, "convert", [str(out / MANIFEST)], "ENOSPC in manifest.json")
    assert not (out / MANIFEST).exists() and not list(out.glob("*.tmp")) and (out / PARTIAL_MANIFEST).exists()
    assert _convert(sources["coco-panoptic"], out).code == 0 and verify_shards(out) == []


def test_disk_full_while_replacing_a_json_file_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / MANIFEST
    target.write_text('{"previous": true}')
    with monkeypatch.context() as patch:
        _full_disk_in_json_dump(patch, MANIFEST)
        with pytest.raises(OSError, match=r"No space left on device: '.*manifest\.json'"):
            shard_writer._write_json_atomic(target, {"a": "x"})
    assert target.read_text() == '{"previous": true}' and not list(tmp_path.glob("*.tmp"))


def test_disk_full_while_writing_an_eval_result_keeps_the_previous_one(sources, tmp_path, monkeypatch):
    davis = sources["davis"] / "Annotations" / "480p"
    out = tmp_path / "result.json"
    args = ["eval", "davis", "--gt-dir", davis, "--pred-dir", davis, "--out", out]
    assert run_cli(args).code == 0
    previous = out.read_text()
    with monkeypatch.context() as patch:
        import pathlib

        def full(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        patch.setattr(pathlib.Path, "write_text", full)
        outcome = run_cli(args)
    assert_one_line_error(outcome, "eval", ["result.json"], "ENOSPC in --out")
    assert out.read_text() == previous and not (tmp_path / "result.json.partial").exists()


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from omgseg.model.checkpoint import load_checkpoint, save_checkpoint
    from omgseg.model.config import model_config
    from omgseg.model.omgseg import OMGSeg

    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny"))
    path = save_checkpoint(model, tmp_path / "model.pt")
    before = path.read_bytes()
    original = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        original(obj, f, *args, **kwargs)
        with open(f, "r+b") as written:  # half the bytes made it to disk
            written.truncate(written.seek(0, 2) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk_save)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(model, path, extra={"step": 2})
    assert path.read_bytes() == before
    load_checkpoint(path)  # still a complete checkpoint
    # The half-written file keeps a name no reader takes for a checkpoint.
    assert [p.name for p in tmp_path.iterdir() if p.name != "model.pt"] in ([], ["model.pt.partial"])
    shutil.rmtree(tmp_path, ignore_errors=True)
