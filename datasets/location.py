"""Where a shard folder is: a local path, or a URL that fsspec opens (http://, https://,
s3:// with the `s3` extra installed, gs:// with the `gcs` extra, file://, ...).

The location may end in a brace pattern of shard file names, e.g.
`https://host/coco/train/shard-{000000..000127}.tar`: then only those shards are read, and
`manifest.json` and `meta.json` are read from the folder the pattern is in. Remote shards are
streamed (tar read front to back), never copied to disk first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from braceexpand import braceexpand

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# URL scheme -> (the fsspec backend it needs, the optional extra of pyproject.toml that installs it).
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class MissingExtra(ValueError):
    """A location whose URL scheme needs an fsspec backend this installation lacks."""
_BRACES = re.compile(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}]*,[^{}]*\}")


@dataclass(frozen=True)
class ShardLocation:
    """base: the folder (a local path or a URL, no trailing '/'); pattern: a brace pattern of
    shard file names inside it, or None for the manifest's full list."""

    base: str
    pattern: str | None = None

    @classmethod
    def parse(cls, spec: str | Path | ShardLocation) -> ShardLocation:
        if isinstance(spec, ShardLocation):
            return spec
        text = str(spec)
        remote = bool(_URL.match(text))
        if not remote:
            text = str(Path(text))
        head, _, last = text.rstrip("/").rpartition("/")
        if _BRACES.search(last):
            return cls(base=head, pattern=last)
        return cls(base=text.rstrip("/") if remote else text)

    @property
    def remote(self) -> bool:
        return bool(_URL.match(self.base))

    def __str__(self) -> str:
        return f"{self.base}/{self.pattern}" if self.pattern else self.base

    def url(self, name: str) -> str:
        """The file `name` of this folder, as a path or a URL."""
        return f"{self.base}/{name}" if self.remote else str(Path(self.base) / name)

    def names(self) -> list[str] | None:
        """The shard file names the pattern selects (None: no pattern)."""
        return list(braceexpand(self.pattern)) if self.pattern else None

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of file `name`; a missing file raises FileNotFoundError naming it."""
        url = self.url(name)
        if not self.remote:
            return open(url, "rb")
        try:
            import fsspec

            return fsspec.open(url, "rb").open()
        except ImportError as err:  # e.g. s3:// without s3fs
            scheme = url.split("://", 1)[0].lower()
            if scheme in EXTRAS:
                backend, extra = EXTRAS[scheme]
                raise MissingExtra(f"{url}: reading {scheme}:// needs {backend}: pip install 'omgseg[{extra}]'") from None
            raise MissingExtra(f"{url}: cannot open it: {err} (install the fsspec backend for {scheme}://)") from None
        except FileNotFoundError as err:
            # fsspec's HTTP reader says "not found" for any failure to reach the file; only an
            # answer of 404 or 410 (or none given) means it is missing, a refused connection may pass.
            cause = err.__cause__
            missing = cause is None or isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) in (404, 410)
            if not missing:
                raise OSError(f"{url}: cannot open it ({type(cause).__name__}: {cause})") from None
            raise FileNotFoundError(f"{url} does not exist") from None
        except OSError as err:  # a refused or dropped connection: not a missing file, and may pass
            raise OSError(f"{url}: cannot open it ({type(err).__name__}: {err})") from None

    def exists(self, name: str) -> bool:
        if not self.remote:
            return Path(self.url(name)).is_file()
        try:
            self.open(name).close()
            return True
        except FileNotFoundError:
            return False

    def read_json(self, name: str, what: str) -> object:
        """JSON file `name`; errors name the file and say what it should have been."""
        url = self.url(name)
        try:
            with self.open(name) as stream:
                data = stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no {what} (is {self} a shard folder written by omgseg convert?)") from None
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            raise ValueError(f"{url}: not valid JSON ({exn})") from None
