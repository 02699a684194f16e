"""Damaged shard folders (tar bytes and members, manifest.json, meta.json) read by `omgseg shards
verify`, `omgseg shards stats` and the training stream."""

import json
from pathlib import Path

import pytest
import torch
from reliability.faults import (
    NON_UTF8,
    assert_one_line_error,
    budget_params,
    damaged_copy,
    fault_names,
    faults,
    files_under,
    fuzz,
    run_cli,
    tree_bytes,
)

from omgseg.datasets.manifest import MANIFEST, META, PARTIAL_MANIFEST, SHARD_PATTERN, ShardReadError
from omgseg.datasets.stream import ShardStream

# One image format with two shards, one video format.
FORMATS = ("coco-panoptic", "vipseg")
# Shard-like and temporary names, so that a copy or rename is something verify must notice.
NEW_NAMES = ("shard-000099", NON_UTF8, "shard-000000.tar", "manifest.partial")


def governed(tree: dict[str, bytes]) -> dict[str, bytes]:
    """The files a shard folder is made of (others, e.g. a stray copy, are not its business)."""
    return {name: data for name, data in tree.items()
            if name in (MANIFEST, META, PARTIAL_MANIFEST) or SHARD_PATTERN.match(name) or name.endswith(".tmp")}


def shard_case(clean: Path, work: Path, check_folder):
    before = governed(tree_bytes(clean))

    def check(fault) -> None:
        with damaged_copy(clean, fault, work, clean.name) as folder:
            check_folder(folder, fault, governed(tree_bytes(folder)) != before)

    return faults(clean, files_under(clean), new_names=NEW_NAMES), check


@pytest.mark.parametrize("examples", budget_params(15, 300))
@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_reports_every_change(fmt, examples, clean_shards, tmp_path):
    def check(folder, fault, changed):
        outcome = run_cli(["shards", "verify", folder])
        assert "Traceback" not in outcome.err, f"{fault}:\n{outcome.err}"
        if not changed:
            assert outcome.code == 0, f"{fault}: {outcome.err}"
            return
        assert outcome.code == 1, f"{fault}: verify passed a changed folder"
        lines = outcome.err.strip().splitlines()
        assert lines and all(line.startswith(f"{folder}: ") for line in lines), f"{fault}:\n{outcome.err}"
        assert json.loads(outcome.out)["problems"] == len(lines)

    fuzz(*shard_case(clean_shards[fmt], tmp_path, check), examples)


@pytest.mark.parametrize("examples", budget_params(15, 300))
@pytest.mark.parametrize("fmt", FORMATS)
def test_stats_is_one_line_or_the_clean_counts(fmt, examples, clean_shards, tmp_path):
    clean = run_cli(["shards", "stats", clean_shards[fmt]])
    assert clean.code == 0, clean.err
    expected = {k: v for k, v in json.loads(clean.out).items() if k != "dir"}

    def check(folder, fault, changed):
        outcome = run_cli(["shards", "stats", folder])
        if outcome.code == 0:
            assert {k: v for k, v in json.loads(outcome.out).items() if k != "dir"} == expected, fault
        else:
            assert_one_line_error(outcome, "shards", [*fault_names(fault), str(folder)], fault)

    fuzz(*shard_case(clean_shards[fmt], tmp_path, check), examples)


def decoded(folder: Path) -> list[tuple]:
    return [(s.key, s.images, s.id_maps, s.segments, s.frame_names) for s in ShardStream(folder)]


def same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) and x[3:] == y[3:]
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("examples", budget_params(15, 300))
@pytest.mark.parametrize("fmt", FORMATS)
def test_training_stream_names_the_shard_or_reads_the_clean_samples(fmt, examples, clean_shards, tmp_path):
    expected = decoded(clean_shards[fmt])

    def check(folder, fault, changed):
        try:
            got = decoded(folder)
        except (ShardReadError, ValueError, FileNotFoundError) as exn:
            message = str(exn)
            assert "\n" not in message.strip(), f"{fault}: {message}"
            assert any(name in message for name in [*fault_names(fault), str(folder)]), f"{fault}: {message}"
        else:
            assert same(got, expected), f"{fault}: the stream read different samples without an error"

    fuzz(*shard_case(clean_shards[fmt], tmp_path, check), examples)
