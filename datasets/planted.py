"""Data sets with known relations ("planted"): what one does to another's validation loss is
known before any training, so a study can be checked against the truth.

Two sets, each written whole into its own cache folder (`PlantedSet.folder`), in COCO
panoptic's layout without crowds. A data set's config names one of them by `variant:`; the
names are unique across the sets. Why each construction produces its effect:
docs/datasets.md, "Planted relations".

- `PLANTED` (four train data sets): an anchor, its twin (helps), its rival (hurts), a stranger
  (none), plus `base` (the common pretraining) and `placebo` (the study's control).
- `PLANTED_LARGE` (six train data sets): two families built like the first set's anchor, twin
  and rival, on looks and names the other family does not have, so that helps and hurts occur
  within each family and none between them; plus `base_large` and `placebo_large`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omgseg.datasets.synth import SPLITS, SynthSizes, write_coco_split
from omgseg.datasets.synth_scenes import (
    EIGHT_SHAPES,
    SHAPE_COLOURS,
    TEXTURE_COLOURS,
    Label,
    stuff_label,
    thing_label,
)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: each set is one module constant
class PlantedSet:
    """Data sets written together into one cache folder, `<name><version>-seed<seed>`.

    labels: each variant's vocabulary (its ids and names, and the look each is drawn with).
    train_weights: relative draw weights of a variant's shape labels, by name, in its train
    split (a name left out weighs 1; val splits draw every class alike).
    seed_key: the generator key of the first variant, the k-th drawing from seed_key + k, so
    no two variants share an image.
    """

    name: str
    version: int  # bump when the set's data change: its cache folder is named after it
    labels: Mapping[str, tuple[Label, ...]]
    train_weights: Mapping[str, Mapping[str, float]]
    seed_key: int
    sizes: SynthSizes = SynthSizes(coco_train=48, coco_val=32)  # a larger val split: the targets are its losses

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def folder(self, seed: int) -> str:
        return f"{self.name}{self.version}-seed{seed}"


def _base(shapes: Sequence[str]) -> tuple[Label, ...]:
    """The common start: every look under names of its own ("object k", "region k"). A model
    trained on it has the generic skills (masks of these shapes and regions, void), so the
    trials' effects on each other are about what their data sets bind to their names."""
    return (*(thing_label(k + 1, f"object {k + 1}", look) for k, look in enumerate(shapes)),
            *(stuff_label(20 + k, f"region {k + 1}", look) for k, look in enumerate(TEXTURE_COLOURS)))


def _family(things: Sequence[str], stuff: Sequence[str]) -> tuple[tuple[Label, ...], tuple[Label, ...]]:
    """A family's (reference, rival) vocabularies, ids 1.. in the order given. The reference
    draws each name with its own look; the rival has the same names and looks, each name drawn
    with the next thing's look (the last with the first's), the two backgrounds' names swapped."""
    kinds = [thing_label] * len(things) + [stuff_label] * len(stuff)
    names = [*things, *stuff]
    looks = [*things[1:], things[0], *stuff[::-1]]
    reference = tuple(kind(k + 1, name) for k, (kind, name) in enumerate(zip(kinds, names)))
    rival = tuple(kind(k + 1, name, look) for k, (kind, name, look) in enumerate(zip(kinds, names, looks)))
    return reference, rival


_ANCHOR, _RIVAL = _family(("circle", "square", "triangle"), ("sky", "grass"))

# The first set (planted data version 3). Its labels and draws are fixed: a change is a new
# version, with a new cache folder and new measurements.
#   twin     = the anchor's appearances under the anchor's names (more of the same): helps;
#   rival    = the anchor's appearances under permuted names (each look called another
#              anchor class, each background the other one): hurts the anchor and the twin;
#   stranger = appearances and names that no other one has: unrelated;
#   placebo  = the same kind of data set as the stranger, with the looks and names left over:
#              the study's control (`control:`), the co-training partner every baseline gets.
PLANTED = PlantedSet(
    name="planted",
    version=3,
    labels={
        "base": _base(EIGHT_SHAPES),
        "anchor": _ANCHOR,
        "twin": _ANCHOR,
        "rival": _RIVAL,
        "stranger": (thing_label(1, "star"), thing_label(2, "cross"), thing_label(3, "hexagon"),
                     stuff_label(4, "water"), stuff_label(5, "road")),
        "placebo": (thing_label(1, "ring"), thing_label(2, "diamond"), stuff_label(3, "sand"), stuff_label(4, "floor")),
    },
    # The anchor's and the twin's train splits each draw one of their three thing classes rarely,
    # and each one's rare class is common in the other: each fills the other's gap in the classes
    # they share, which no unrelated data set can. Without it the twin was only more images of
    # the anchor's classes, and what that added beyond any other data set's extra steps was below
    # the study's MDE in one direction.
    train_weights={"anchor": {"triangle": 0.1}, "twin": {"circle": 0.1}},
    seed_key=100,
)

_ANCHOR_B, _RIVAL_B = _family(("pentagon", "arrow", "heart"), ("water", "road"))

# The large set: two families, each an anchor, a twin and a rival built as the first set's.
# Family a has the first set's looks and names (circle, square, triangle over sky and grass),
# family b looks and names of its own (pentagon, arrow, heart over water and road), so that
# within a family the twin helps and the rival hurts, and between the families nothing is
# shared: 4 helps, 8 hurts and 18 none among the 30 ordered pairs. The placebo has looks and
# names neither family has, as many as each of them (three things, two backgrounds): with the
# first set's two-thing placebo (version 1 of this set), a partner from the other family lowered
# a target's loss by 0.1 more than the placebo did, on average over the 18 unrelated pairs.
PLANTED_LARGE = PlantedSet(
    name="planted-large",
    version=2,
    labels={
        "base_large": _base(tuple(SHAPE_COLOURS)),
        "anchor_a": _ANCHOR,
        "twin_a": _ANCHOR,
        "rival_a": _RIVAL,
        "anchor_b": _ANCHOR_B,
        "twin_b": _ANCHOR_B,
        "rival_b": _RIVAL_B,
        "placebo_large": (thing_label(1, "ring"), thing_label(2, "diamond"), thing_label(3, "star"),
                          stuff_label(4, "sand"), stuff_label(5, "floor")),
    },
    train_weights={"anchor_a": {"triangle": 0.1}, "twin_a": {"circle": 0.1},
                   "anchor_b": {"heart": 0.1}, "twin_b": {"pentagon": 0.1}},
    seed_key=200,
)

PLANTED_SETS: tuple[PlantedSet, ...] = (PLANTED, PLANTED_LARGE)
PLANTED_VARIANTS: tuple[str, ...] = tuple(v for s in PLANTED_SETS for v in s.variants)
if len(set(PLANTED_VARIANTS)) != len(PLANTED_VARIANTS):
    raise RuntimeError(f"planted variant names repeat across sets: {PLANTED_VARIANTS}")


def planted_set(variant: str) -> PlantedSet:
    """The set a variant belongs to; an unknown name is an error listing the known ones."""
    for pset in PLANTED_SETS:
        if variant in pset.labels:
            return pset
    raise ValueError(f"unknown planted variant {variant!r}; known: {', '.join(PLANTED_VARIANTS)}")


def write_planted(out: Path, variants: Sequence[str], seed: int = 0, progress: bool = False) -> dict[str, Path]:
    """Planted data sets, each in COCO panoptic's layout under out/<variant>/, without crowds;
    returns {variant: its source folder}. A variant's files are the same whichever others are
    written with it: each draws from its own generator, keyed by its set and position."""
    sets = {v: planted_set(v) for v in variants}  # raises on an unknown name before writing
    total = sum(s.sizes.coco_train + s.sizes.coco_val for s in sets.values())
    bar = tqdm(total=total, desc="synth planted", unit="image", disable=not progress)
    try:
        for variant, pset in sets.items():
            key = pset.seed_key + pset.variants.index(variant)
            for split_index, split in enumerate(SPLITS):
                rng = np.random.default_rng(np.random.SeedSequence([seed, key, split_index]))
                weights = pset.train_weights.get(variant) if split == "train" else None
                write_coco_split(Path(out) / variant, split, rng, pset.sizes, ["coco-panoptic"], bar,
                                 labels=pset.labels[variant], crowds=False, weights=weights)
    finally:
        bar.close()
    return {v: Path(out) / v for v in variants}
