"""`omgseg convert` on damaged sources of all six formats: one line naming the file and exit 1,
or shards that hold exactly what the reader read and decode as training reads them."""

from pathlib import Path

import numpy as np
import pytest
from reliability.faults import assert_one_line_error, budget_params, damaged_copy, fault_names, faults, files_under, fuzz, run_cli

from omgseg.datasets.formats import get_format
from omgseg.datasets.manifest import MANIFEST, read_manifest, sample_key
from omgseg.datasets.shard_check import verify_shards
from omgseg.datasets.shard_reader import read_shard_samples
from omgseg.datasets.shard_writer import encode_clip
from omgseg.datasets.stream import decode_sample


def read_by_split(fmt: str, rel: str) -> bool:
    """Files the train split of `fmt` reads (the COCO folder holds both COCO formats)."""
    if fmt == "coco-panoptic" and "instances" in rel or fmt == "coco-instances" and "panoptic" in rel:
        return False
    return "train" in rel or rel.endswith("panoVIPSeg_categories.json")


def assert_round_trip(fmt: str, src: Path, out: Path) -> None:
    """The shards hold the reader's clips byte for byte, verify clean, and decode."""
    clips = list(get_format(fmt).clips(src, "train", None))
    manifest = read_manifest(out)
    raws = [raw for info in manifest.shards for raw in read_shard_samples(out / info.name, expected=info)]
    assert len(raws) == len(clips)
    for index, (clip, raw) in enumerate(zip(clips, raws, strict=True)):
        assert {k: v for k, v in raw.items() if k != "__url__"} == encode_clip(clip, sample_key(index))
        decoded = decode_sample(raw)
        assert np.array_equal(decoded.id_maps.numpy(), clip.id_maps.astype(np.int64))
    assert verify_shards(out) == []


def convert_case(fmt: str, clean: Path, work: Path):
    files = files_under(clean, lambda rel: read_by_split(fmt, rel))

    def check(fault) -> None:
        with damaged_copy(clean, fault, work, "src") as src:
            out = src.parent / "out"
            outcome = run_cli(["convert", fmt, "--src", src, "--out", out, "--split", "train",
                               "--samples-per-shard", "1"])
            if outcome.code == 0:
                assert_round_trip(fmt, src, out)
            else:
                assert_one_line_error(outcome, "convert", fault_names(fault), fault)
                assert not (out / MANIFEST).exists(), f"{fault}: a failed conversion left a finished manifest"

    return faults(clean, files), check


FORMATS = ("coco-panoptic", "coco-instances", "ade-panoptic", "vipseg", "ytvis", "davis")


@pytest.mark.parametrize("examples", budget_params(12, 300))
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_damaged_source(fmt, examples, sources, tmp_path):
    strategy, check = convert_case(fmt, sources[fmt], tmp_path)
    fuzz(strategy, check, examples)
