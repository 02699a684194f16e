"""The study design object: combinations as tuples from every kind of config, the comparisons it
gives each target, balanced sampled subsets, and the exhaustive design a sampled one is costed
against."""

import itertools
from collections import Counter
from pathlib import Path

import pytest

from omgseg.platform.config import StudyConfig, load_config
from omgseg.platform.study.design import SampledSubsets, StudyDesign, balanced_subsets

ROOT = Path(__file__).resolve().parents[3]
DEFAULT = ROOT / "studies" / "configs" / "default.yaml"
PLANTED = ROOT / "studies" / "configs" / "planted.yaml"


def _design(path=DEFAULT, *overrides) -> StudyDesign:
    return StudyDesign.from_config(load_config(StudyConfig, path, list(overrides)))


def test_the_default_design_and_its_comparisons():
    design = _design()
    assert design.train == ("coco", "vipseg", "davis")
    assert design.combinations == (("coco",), ("vipseg",), ("davis",), ("coco", "vipseg"), ("coco", "davis"),
                                   ("vipseg", "davis"), ("coco", "vipseg", "davis"))
    assert design.kinds == ("pair", "leave_one_out")
    rows = {(c.kind, c.source): (c.with_combo, c.without_combo) for c in design.comparisons("vipseg")}
    assert rows == {("pair", "coco"): (("coco", "vipseg"), ("vipseg",)),
                    ("pair", "davis"): (("vipseg", "davis"), ("vipseg",)),
                    ("leave_one_out", "coco"): (("coco", "vipseg", "davis"), ("vipseg", "davis")),
                    ("leave_one_out", "davis"): (("coco", "vipseg", "davis"), ("coco", "vipseg"))}
    assert [c.kind for c in design.comparisons("ade")] == ["leave_one_out"] * 3  # evaluated only
    assert StudyDesign.name(("coco", "davis")) == "coco+davis"
    assert design.order(["davis", "coco"]) == ("coco", "davis")
    with pytest.raises(ValueError, match=r"\['kitti'\] are not data sets of this study"):
        design.order(["kitti"])


def test_a_design_without_singletons_has_no_pair_rows():
    design = _design(DEFAULT, "combinations=[pairs, all]")
    assert design.kinds == ("leave_one_out",) and not any(c.kind == "pair" for c in design.comparisons("coco"))
    assert design.pair_comparison("coco", "davis") is None


def test_a_control_adds_its_pairs_and_controlled_rows():
    design = _design(PLANTED)
    assert design.control == "placebo" and ("anchor", "placebo") in design.combinations
    assert design.kinds == ("pair", "controlled", "leave_one_out")
    controlled = design.pair_comparison("twin", "anchor", controlled=True)
    assert (controlled.with_combo, controlled.without_combo) == (("anchor", "twin"), ("anchor", "placebo"))
    exhaustive = design.exhaustive()
    assert len(exhaustive.combinations) == 4 + 6 + 4 and ("anchor", "twin", "rival", "stranger") not in exhaustive.combinations


def test_sampled_subsets_are_balanced_distinct_and_seeded():
    names = ("a", "b", "c", "d", "e", "f")
    subsets = balanced_subsets(names, SampledSubsets(subsets=10, sizes=(3,), seed=1))
    assert len(set(subsets)) == 10 and all(len(s) == 3 and list(s) == sorted(s) for s in subsets)
    singles = Counter(n for s in subsets for n in s)
    pairs = Counter(p for s in subsets for p in itertools.combinations(s, 2))
    assert max(singles.values()) - min(singles.values()) <= 1  # 30 places over 6 data sets: 5 each
    assert len(pairs) == 15 and max(pairs.values()) <= 3  # every pair appears, none more than thrice
    assert subsets == balanced_subsets(names, SampledSubsets(subsets=10, sizes=(3,), seed=1))
    assert subsets != balanced_subsets(names, SampledSubsets(subsets=10, sizes=(3,), seed=2))
    with pytest.raises(ValueError, match="only 20 distinct subsets"):
        balanced_subsets(names, SampledSubsets(subsets=21, sizes=(3,)))


def test_a_sampled_design_draws_from_the_train_data_sets_and_the_control():
    design = _design(PLANTED, "combinations={sampled: {subsets: 8, sizes: [2, 3]}}")
    assert design.sampled == design.combinations and len(design.sampled) == 8
    assert {n for s in design.sampled for n in s} == {"anchor", "twin", "rival", "stranger", "placebo"}
    assert "surrogate" in design.kinds and "surrogate_controlled" in design.kinds
    assert not any(c == ("anchor", "placebo") for c in design.combinations if c not in design.sampled)  # no added pairs
    with pytest.raises(Exception, match=r"combinations.sampled.sizes: \[6\] must be between 1 and 5"):
        _design(PLANTED, "combinations={sampled: {subsets: 8, sizes: [6]}}")
