"""A shard folder's records: manifest.json (what was written, from what, with which parameters,
a sha256 per shard) and meta.json (the data set's vocabulary), read as typed records; the
names of shards, sample keys and fields (schema: docs/datasets.md)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from omgseg.core.structures import Category, Task
from omgseg.datasets.heldout import HeldOutSplit
from omgseg.datasets.location import ShardLocation

# Bump when what a conversion writes for the same clips changes (shard bytes or the manifest's
# fields): folders of another version are rebuilt, and read nowhere else.
CONVERTER_VERSION = "2"

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
META = "meta.json"
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.tar$")
KEY_DIGITS = 9


class ShardReadError(RuntimeError):
    """A shard that cannot be read as the manifest describes; the message names the shard
    file and, where one was reached, the sample key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # webdataset appends context to `args` of exceptions passing through its stages;
        # the message stays the one written here.
        return self.message


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard: file name in the folder, samples, samples with at least one
    segment (`annotated`), size in bytes, sha256 (hex)."""

    name: str
    samples: int
    annotated: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "samples": self.samples, "annotated": self.annotated, "bytes": self.bytes,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: object, where: str) -> ShardInfo:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {obj!r}")
        for key in ("name", "samples", "annotated", "bytes", "sha256"):
            if key not in obj:
                raise ValueError(f"{where}: no {key!r} field in {obj!r}")
        for key in ("samples", "annotated", "bytes"):
            if not isinstance(obj[key], int) or isinstance(obj[key], bool) or obj[key] < 0:
                raise ValueError(f"{where}: {key!r} must be a count (an integer >= 0), got {obj[key]!r}")
        return cls(str(obj["name"]), obj["samples"], obj["annotated"], obj["bytes"], str(obj["sha256"]))


@dataclass(frozen=True)
class Manifest:
    """What a shard folder holds and how it was made.

    source: where the clips came from ({"format", "src", "split", ...} as the caller gave it).
    parameters: conversion parameters that change the shards ({"samples_per_shard", ...}).
    created: ISO 8601 UTC time the conversion started (kept across a resume).
    meta_sha256: sha256 of the folder's meta.json as written, so an edited vocabulary is
        detected.
    heldout: for a folder cut from a train split with a held-out part (datasets/heldout.py),
        which side it is and the held-out ids; None otherwise.

    On disk the manifest also carries `checksum`, the sha256 of its own canonical JSON
    without that field (`manifest_checksum`): an edit or corruption of the manifest itself
    is detected too.
    """

    dataset: str
    shards: tuple[ShardInfo, ...]
    total_samples: int
    converter_version: str
    source: dict
    parameters: dict
    created: str
    meta_sha256: str
    heldout: HeldOutSplit | None = None

    @property
    def annotated_samples(self) -> int:
        """Samples with at least one segment: none means a split without annotations."""
        return sum(s.annotated for s in self.shards)

    def to_json(self) -> dict:
        doc = {
            "dataset": self.dataset,
            "converter_version": self.converter_version,
            "created": self.created,
            "source": self.source,
            "parameters": self.parameters,
            "total_samples": self.total_samples,
            "shards": [s.to_json() for s in self.shards],
            "meta_sha256": self.meta_sha256,
            "heldout": self.heldout.to_json() if self.heldout is not None else None,
        }
        doc["checksum"] = manifest_checksum(doc)
        return doc

    @classmethod
    def from_json(cls, obj: object, where: str) -> Manifest:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        version = obj.get("converter_version")
        if version != CONVERTER_VERSION:
            raise ValueError(f"{where}: written by omgseg convert version {version}, this omgseg reads version "
                             f"{CONVERTER_VERSION}: convert the data set again")
        fields = ("dataset", "created", "source", "parameters", "total_samples", "shards", "meta_sha256", "heldout")
        for key in fields:
            if key not in obj:
                raise ValueError(f"{where}: no {key!r} field (fields present: {sorted(obj)})")
        if not isinstance(obj["shards"], list):
            raise ValueError(f"{where}: 'shards' must be a list, got {type(obj['shards']).__name__}")
        shards = tuple(ShardInfo.from_json(s, f"{where}: shards[{i}]") for i, s in enumerate(obj["shards"]))
        for key in ("source", "parameters"):
            if not isinstance(obj[key], dict):
                raise ValueError(f"{where}: {key!r} must be an object, got {type(obj[key]).__name__}")
        total = obj["total_samples"]
        if not isinstance(total, int) or isinstance(total, bool):
            raise ValueError(f"{where}: 'total_samples' must be an integer, got {total!r}")
        heldout = obj["heldout"]
        manifest = cls(
            dataset=str(obj["dataset"]),
            shards=shards,
            total_samples=total,
            converter_version=version,
            source=dict(obj["source"]),
            parameters=dict(obj["parameters"]),
            created=str(obj["created"]),
            meta_sha256=str(obj["meta_sha256"]),
            heldout=HeldOutSplit.from_json(heldout, f"{where}: heldout") if heldout is not None else None,
        )
        counted = sum(s.samples for s in shards)
        if counted != manifest.total_samples:
            raise ValueError(
                f"{where}: total_samples is {manifest.total_samples} but the shards hold {counted}"
            )
        return manifest

    def identity(self) -> dict:
        """What must match for two conversions to give the same shards."""
        return {
            "dataset": self.dataset,
            "converter_version": self.converter_version,
            "source": self.source,
            "parameters": self.parameters,
            "heldout": self.heldout.to_json() if self.heldout is not None else None,
        }


@dataclass(frozen=True)
class ShardMeta:
    """The content of `meta.json`: the dataset, where it came from, its tasks and vocabulary.
    The converter writes it, every reader reads it back."""

    dataset: str
    format: str
    split: str
    tasks: tuple[Task, ...]
    categories: tuple[Category, ...]

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "format": self.format, "split": self.split,
                "tasks": [t.value for t in self.tasks], "categories": [c.to_json() for c in self.categories]}

    @classmethod
    def from_json(cls, obj: object, where: str) -> ShardMeta:
        """Errors name `where` and the field."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("dataset", "format", "split", "tasks", "categories"):
            if key not in obj:
                raise ValueError(f"{where}: no {key!r} field (fields present: {sorted(obj)})")
        for key in ("tasks", "categories"):
            if not isinstance(obj[key], list):
                raise ValueError(f"{where}: {key!r} must be a list, got {type(obj[key]).__name__}")
        try:
            tasks = tuple(Task.parse(t) for t in obj["tasks"])
            categories = tuple(Category.from_json(c, where) for c in obj["categories"])
        except (TypeError, ValueError) as exn:  # a mistyped value: say where
            message = str(exn) if str(exn).startswith(where) else f"{where}: {exn}"
            raise ValueError(message) from None
        return cls(str(obj["dataset"]), str(obj["format"]), str(obj["split"]), tasks, categories)


def manifest_checksum(doc: dict) -> str:
    """sha256 of a manifest's JSON without its `checksum` field (sorted keys, compact)."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def checksum_problem(doc: object, where: str) -> str | None:
    """Why a manifest's `checksum` is missing or does not match its content (None: it matches)."""
    if not isinstance(doc, dict):
        return None
    if "checksum" not in doc:
        return f"{where}: no checksum field, so edits cannot be detected (it was removed)"
    try:
        if doc["checksum"] == manifest_checksum(doc):
            return None
    except (TypeError, ValueError):  # values json cannot write back, e.g. lone surrogates
        pass
    return f"{where}: content does not match its checksum field: the manifest was edited or corrupted after conversion"


def read_manifest(shard_dir: Path | str | ShardLocation, *, check_checksum: bool = False) -> Manifest:
    """The finished manifest of a shard folder (a path or URL, docs/datasets.md "Shard
    locations"); errors name the file and the missing field. `check_checksum`: a manifest
    whose checksum does not match (edited or corrupted) is an error too; training relies on
    the per-shard sha256 instead."""
    location = ShardLocation.parse(shard_dir)
    doc = location.read_json(MANIFEST, "manifest")
    manifest = Manifest.from_json(doc, location.url(MANIFEST))
    problem = checksum_problem(doc, location.url(MANIFEST)) if check_checksum else None
    if problem:
        raise ValueError(problem)
    return manifest


def read_meta(shard_dir: Path | str | ShardLocation, manifest: Manifest | None = None) -> ShardMeta:
    """`meta.json` of a shard folder (a path or URL) as a typed record; errors name the file
    and the field. With the folder's `manifest`, a meta.json whose sha256 differs from the
    one recorded at conversion is an error (an edited vocabulary)."""
    location = ShardLocation.parse(shard_dir)
    path = location.url(META)
    if manifest is not None:
        try:
            with location.open(META) as stream:
                data = stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no meta.json (is {location} a shard folder written by omgseg convert?)") from None
        if hashlib.sha256(data).hexdigest() != manifest.meta_sha256:
            raise ValueError(f"{path}: sha256 differs from meta_sha256 in {MANIFEST}: meta.json was edited or "
                             "corrupted after conversion")
    return ShardMeta.from_json(location.read_json(META, "meta.json"), str(path))


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    """Running sample index, zero-padded; no dots (webdataset splits key and field there)."""
    return f"{index:0{KEY_DIGITS}d}"


def frame_field(t: int) -> str:
    return f"f{t:03d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
