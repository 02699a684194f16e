"""Tiny synthetic data in all six public formats, and their clean shard folders, written once
per session; each fuzz case copies what it damages."""

import pytest

from omgseg.datasets.convert import convert
from omgseg.datasets.synth import SYNTH_FORMATS, SynthSizes, write_synthetic

# The smallest the generator allows: a fuzz case copies a source folder and converts it.
SIZES = SynthSizes(height=48, width=48, coco_train=2, coco_val=2, ade_train=1, ade_val=1, video_train=1,
                   video_val=1, min_frames=5, max_frames=5)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """{format: source folder}, train and val splits."""
    return write_synthetic(tmp_path_factory.mktemp("reliability-src"), SYNTH_FORMATS, seed=0, sizes=SIZES)


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory, sources):
    """{format: shard folder of its train split}, one sample per shard so a folder has several."""
    root = tmp_path_factory.mktemp("reliability-shards")
    return {name: convert(name, src, root / name, "train", samples_per_shard=1) and root / name
            for name, src in sources.items()}
