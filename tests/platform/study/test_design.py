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


def test_sampled_subsets_are_balanced_distinct_at_a_seed_different_across_seeds_and_seeded():
    names = ("a", "b", "c", "d", "e", "f")
    spec = SampledSubsets(subsets=5, sizes=(3,), seeds=(0, 1, 2, 3), seed=1)
    draws = balanced_subsets(names, spec)
    assert [s for s, _ in draws] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    for seed in range(4):
        here = [c for s, c in draws if s == seed]
        assert len(set(here)) == 5 and all(len(c) == 3 and list(c) == sorted(c) for c in here)
    assert len({c for _, c in draws}) == 20  # the seeds draw different subsets while any are left
    singles = Counter(n for _, c in draws for n in c)
    pairs = Counter(p for _, c in draws for p in itertools.combinations(c, 2))
    assert set(singles.values()) == {10}  # 60 places over 6 data sets
    assert len(pairs) == 15 and max(pairs.values()) - min(pairs.values()) <= 1
    assert draws == balanced_subsets(names, spec)
    assert draws != balanced_subsets(names, SampledSubsets(subsets=5, sizes=(3,), seeds=(0, 1, 2, 3), seed=2))
    with pytest.raises(ValueError, match="only 20 distinct subsets .* 21 asked for at each seed"):
        balanced_subsets(names, SampledSubsets(subsets=21, sizes=(3,), seeds=(0,)))


def test_a_sampled_subset_is_trained_at_the_seeds_it_was_drawn_at():
    from omgseg.platform.study.plan import plan_trials

    config = load_config(StudyConfig, PLANTED, ["combinations={sampled: {subsets: 3, sizes: [2, 3]}}", "seeds=[0, 1, 2]",
                                                "train.affinity.enabled=false"])
    design = StudyDesign.from_config(config)
    trials = plan_trials(config)
    assert sorted((t.seed, t.datasets) for t in trials) == sorted(design.draws) and len(trials) == 9
    assert {t.trial_id for t in trials} == {f"{design.name(c)}-s{s}" for s, c in design.draws}
    # a subset another item names too is trained, and fitted, at every seed
    both = load_config(StudyConfig, PLANTED, ["combinations=[singletons, {sampled: {subsets: 5, sizes: [1]}}]",
                                              "seeds=[0, 1]", "train.affinity.enabled=false"])
    design = StudyDesign.from_config(both)
    assert design.seeds_of(("anchor",), [0, 1]) == [0, 1] and ("placebo",) in design.sampled
    assert sorted(design.draws) == sorted((s, c) for c in design.sampled for s in (0, 1))


def test_a_sampled_design_draws_from_the_train_data_sets_and_the_control():
    design = _design(PLANTED, "combinations={sampled: {subsets: 8, sizes: [2, 3]}}")
    assert design.sampled == design.combinations and len(design.draws) == 8 * 6  # at each of planted.yaml's 6 seeds
    assert {n for s in design.sampled for n in s} == {"anchor", "twin", "rival", "stranger", "placebo"}
    assert "surrogate" in design.kinds and "surrogate_controlled" in design.kinds
    assert not any(c == ("anchor", "placebo") for c in design.combinations if c not in design.sampled)  # no added pairs
    with pytest.raises(Exception, match=r"combinations.sampled.sizes: \[6\] must be between 1 and 5"):
        _design(PLANTED, "combinations={sampled: {subsets: 8, sizes: [6]}}")
