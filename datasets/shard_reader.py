"""Reading a shard's raw samples back, local or remote, checked against the manifest's count,
size and sha256 as they stream (`read_shard_samples`).

A read that stopped before the shard's end (a connection cut, a refused connection, a short
transfer) raises `TransientReadError`: reading the shard again may succeed, and remote readers
retry it (omgseg.datasets.stream). A shard that was read whole but whose sha256 differs from
the manifest, or that does not exist, raises a plain `ShardReadError`: reading it again gives
the same bytes."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from omgseg.datasets.location import MissingExtra, ShardLocation
from omgseg.datasets.manifest import ShardInfo, ShardReadError


class TransientReadError(ShardReadError):
    """A shard read that stopped early; the same read may succeed when tried again."""


class _TarContext:
    """The shard being read and its last member, for error messages. webdataset's handler
    receives only the exception, so the context is kept here as reading proceeds."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.last_member: str | None = None

    def note_member(self, fname: str) -> str:
        self.last_member = fname
        return fname

    def where(self) -> str:
        if self.last_member is None:
            return f"shard {self.shard} (before its first sample)"
        return f"shard {self.shard}, sample {self.last_member.split('.', 1)[0]} (member {self.last_member})"

    def handler(self, exn: Exception) -> bool:
        # Re-raise with the shard and sample named, never warn-and-continue: a skipped sample
        # would silently change what a study trains or evaluates on.
        if isinstance(exn, ShardReadError):
            raise exn
        first = exn.args[0] if exn.args else ""
        raise TransientReadError(f"{self.where()}: cannot read tar ({type(exn).__name__}: {first})") from exn


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what is read through it."""

    def __init__(self, raw) -> None:  # noqa: ANN001 - any binary stream
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer, as io.RawIOBase.readinto
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: the end-of-archive blocks and padding."""
        for block in iter(lambda: self.raw.read(1 << 20), b""):
            self.sha256.update(block)
            self.size += len(block)

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_shard_samples(
    path: Path | str, *, expected: ShardInfo | None = None
) -> Iterator[dict]:
    """Raw samples of one shard (a local path, or a URL fsspec opens, read as a stream):
    {"__key__", "__url__", field: bytes}, in file order.

    With `expected`, a sample count, size or sha256 different from the manifest's raises once
    the shard has been read to its end (tarfile reads a corrupt header in mid-archive as the
    end of the archive, so only counting and hashing tell; the samples before were yielded
    already). Errors are `ShardReadError` naming the shard and the sample reached.
    """
    location = ShardLocation.parse(path)
    name = str(path)
    context = _TarContext(name)
    try:
        if location.remote:
            folder, _, file_name = name.rpartition("/")
            raw = ShardLocation(folder).open(file_name)
        else:
            raw = open(name, "rb")  # noqa: SIM115 - closed below, after the generator finishes
    except (FileNotFoundError, IsADirectoryError):
        raise ShardReadError(f"shard {name} does not exist") from None
    except MissingExtra:
        raise  # its own one line: not a read that may pass
    except Exception as exn:  # noqa: BLE001 - OSError, or an HTTP client's own errors (a 503): re-raised, named
        raise TransientReadError(f"shard {name}: cannot open ({exn})") from None
    stream = _HashingReader(raw)
    buffered = io.BufferedReader(stream)  # held here: when collected it would close the file
    try:
        files = wds.tariterators.tar_file_expander([{"stream": buffered, "url": name}],
                                                   handler=context.handler, rename_files=context.note_member)
        count = 0
        last_key = None
        for sample in wds.tariterators.group_by_keys(files, handler=context.handler):
            count += 1
            last_key = sample["__key__"]
            yield sample
        if expected is None:
            return
        try:
            stream.drain()
        except Exception as exn:  # noqa: BLE001 - as for opening
            raise TransientReadError(f"shard {name}: read failed after sample {last_key} ({exn})") from None
        if count != expected.samples or stream.size != expected.bytes:
            raise TransientReadError(
                f"shard {name}: read {count} samples ({stream.size} bytes) but the manifest says "
                f"{expected.samples} ({expected.bytes} bytes); last sample read: {last_key}; "
                f"the shard is truncated or corrupt"
            )
        if stream.sha256.hexdigest() != expected.sha256:
            raise ShardReadError(f"shard {name}: sha256 differs from the manifest: the shard is corrupt "
                                 f"(its {count} samples were read)")
    finally:
        buffered.close()


def decode_png_rgb(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8; an id map that is not RGB is an error, not converted."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB":
            raise ValueError(f"id map PNG must be RGB, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8).copy()
