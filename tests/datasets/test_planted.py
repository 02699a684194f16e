"""The planted data sets are built as docs/datasets.md ("Planted relations") says, and each
planted config states the effects its data were built to have.

The exhaustive study that recovers the large set's effects is a benchmark
(`tests/benchmarks/bench_study.py --config studies/configs/planted_large.yaml`, about half an
hour); these tests check its data and truth in seconds.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omgseg.datasets.planted import PLANTED, PLANTED_LARGE, PLANTED_SETS, planted_set, write_planted
from omgseg.datasets.synth_scenes import SHAPE_COLOURS, TEXTURE_COLOURS, Label, image_scene
from omgseg.platform.config import StudyConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "studies" / "configs"


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict[str, Path]:
    return write_planted(tmp_path_factory.mktemp("large"), PLANTED_LARGE.variants)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def thing_counts(panoptic_json: Path) -> Counter:
    data = load(panoptic_json)
    things = {c["id"]: c["name"] for c in data["categories"] if c["isthing"]}
    return Counter(things[s["category_id"]] for a in data["annotations"] for s in a["segments_info"]
                   if s["category_id"] in things)


def rare_classes(variant: str) -> set[str]:
    return {name for name, w in planted_set(variant).train_weights.get(variant, {}).items() if w < 1}


def constructed_effect(source: str, target: str) -> str:
    """What the source does to the target, read off the two vocabularies alone (docs/datasets.md):
    the same looks under the same names, the target's rare classes common in the source: helps;
    the same names and looks bound differently: hurts; no name and no look in common: none."""
    src, tgt = planted_set(source).labels[source], planted_set(target).labels[target]
    bindings = [{(lab.name, lab.look, lab.isthing) for lab in labels} for labels in (src, tgt)]
    names = [{lab.name for lab in labels} for labels in (src, tgt)]
    looks = [{lab.look for lab in labels} for labels in (src, tgt)]
    if bindings[0] == bindings[1] and rare_classes(target) and not rare_classes(target) & rare_classes(source):
        return "helps"
    if names[0] == names[1] and looks[0] == looks[1] and not bindings[0] & bindings[1]:
        return "hurts"
    if not names[0] & names[1] and not looks[0] & looks[1]:
        return "none"
    raise AssertionError(f"{source} -> {target} is none of the planted constructions")


@pytest.mark.parametrize("config_name, counts", [
    ("planted.yaml", {"helps": 2, "hurts": 4, "none": 6}),
    ("planted_large.yaml", {"helps": 4, "hurts": 8, "none": 18}),
])
def test_each_config_states_what_its_data_were_built_to_do(config_name, counts):
    config = load_config(StudyConfig, CONFIGS / config_name)  # refuses a truth that misses an ordered pair
    variant = {name: spec.variant for name, spec in config.data.datasets.items()}
    stated = {(p.source, p.target): p.effect for p in config.planted}
    built = {pair: constructed_effect(variant[pair[0]], variant[pair[1]]) for pair in stated}
    assert stated == built
    assert Counter(stated.values()) == counts
    trained = config.trained()
    assert len(stated) == len(trained) * (len(trained) - 1)
    for name in trained:  # the control is related to no train data set
        assert constructed_effect(variant[config.control], variant[name]) == "none"
    # The pretraining data set holds every look of every data set the study trains or controls with.
    (base,) = config.pretrain.mix
    base_looks = {lab.look for lab in planted_set(variant[base]).labels[variant[base]]}
    for name in [*trained, config.control]:
        assert {lab.look for lab in planted_set(variant[name]).labels[variant[name]]} <= base_looks


def test_the_large_set_has_new_looks_and_every_look_in_its_base():
    base = PLANTED_LARGE.labels["base_large"]
    assert {lab.look for lab in base} == set(SHAPE_COLOURS) | set(TEXTURE_COLOURS)
    family_b = {lab.look for lab in PLANTED_LARGE.labels["anchor_b"] if lab.isthing}
    assert family_b == {"pentagon", "arrow", "heart"} and not family_b & {lab.look for lab in PLANTED.labels["base"]}
    assert len({lab.name for lab in base}) == len(base)


def test_the_large_set_draws_the_planted_class_counts(large):
    """Each anchor's and twin's train split holds rarely the class the other's holds often; their
    val splits hold every class alike; the rivals draw theirs alike."""
    for variant in ("anchor_a", "twin_a", "anchor_b", "twin_b"):
        (rare,) = rare_classes(variant)
        counts = {split: thing_counts(large[variant] / f"annotations/panoptic_{split}2017.json") for split in ("train", "val")}
        assert counts["train"][rare] * 4 < min(n for name, n in counts["train"].items() if name != rare), (variant, counts)
        assert counts["val"][rare] * 2 > max(counts["val"].values()), (variant, counts)
        partner = variant.replace("anchor", "twin") if "anchor" in variant else variant.replace("twin", "anchor")
        assert counts["train"][rare] * 4 < thing_counts(large[partner] / "annotations/panoptic_train2017.json")[rare]
    for rival in ("rival_a", "rival_b"):
        counts = thing_counts(large[rival] / "annotations/panoptic_train2017.json")
        assert len(counts) == 3 and min(counts.values()) * 2 > max(counts.values()), counts
    assert len(load(large["anchor_a"] / "annotations/panoptic_train2017.json")["images"]) == PLANTED_LARGE.sizes.coco_train


def test_every_thing_is_drawn_in_its_labels_look(large):
    """The pixels say which look a segment has: the median colour of every thing segment is
    nearest its label's look colour (the rivals' names on other looks included)."""
    names, colours = list(SHAPE_COLOURS), np.array(list(SHAPE_COLOURS.values()), dtype=np.float64)
    for variant, root in large.items():
        labels: dict[int, Label] = {lab.id: lab for lab in PLANTED_LARGE.labels[variant]}
        data = load(root / "annotations/panoptic_val2017.json")
        for ann in data["annotations"]:
            rgb = np.asarray(Image.open(root / "val2017" / ann["file_name"].replace(".png", ".jpg")), dtype=np.float64)
            code = np.asarray(Image.open(root / "annotations/panoptic_val2017" / ann["file_name"]), dtype=np.int64)
            ids = code[..., 0] + 256 * code[..., 1] + 65536 * code[..., 2]
            for seg in ann["segments_info"]:
                label = labels[seg["category_id"]]
                if label.isthing:
                    median = np.median(rgb[ids == seg["id"]], axis=0)
                    assert names[int(np.argmin(np.linalg.norm(colours - median, axis=1)))] == label.look, (variant, seg)


def test_planted_data_are_deterministic_and_keyed_per_variant(large, tmp_path):
    alone = write_planted(tmp_path / "alone", ["rival_b"])
    for split in ("train", "val"):
        name = f"annotations/panoptic_{split}2017.json"
        assert (alone["rival_b"] / name).read_bytes() == (large["rival_b"] / name).read_bytes()
    other_seed = write_planted(tmp_path / "seed1", ["rival_b"], seed=1)
    assert (other_seed["rival_b"] / "annotations/panoptic_val2017.json").read_bytes() != \
        (large["rival_b"] / "annotations/panoptic_val2017.json").read_bytes()
    twin, anchor = (load(large[v] / "annotations/panoptic_train2017.json") for v in ("twin_b", "anchor_b"))
    assert twin["annotations"] != anchor["annotations"]  # new images, not copies


def test_each_set_has_its_own_cache_folder_and_unknown_variants_are_refused(tmp_path):
    assert PLANTED.folder(0) == "planted3-seed0"  # the folder planted.yaml's measured runs used
    assert PLANTED_LARGE.folder(2) == "planted-large2-seed2"
    assert len({s.folder(0) for s in PLANTED_SETS}) == len(PLANTED_SETS)
    with pytest.raises(ValueError, match="unknown planted variant 'anchor_c'; known: base, anchor, .*anchor_a"):
        write_planted(tmp_path, ["anchor_a", "anchor_c"])
    assert not any(tmp_path.iterdir())


def test_the_first_set_shares_and_conflicts_as_documented(tmp_path):
    labels, variants = PLANTED.labels, PLANTED.variants
    written = write_planted(tmp_path, variants)
    names = {v: {c["name"] for c in load(written[v] / "annotations/panoptic_val2017.json")["categories"]} for v in variants}
    looks = {v: {(lab.name, lab.look) for lab in labels[v]} for v in variants}
    assert looks["twin"] == looks["anchor"]  # the same looks under the same names
    assert names["rival"] == names["anchor"] and not looks["rival"] & looks["anchor"]  # same names, permuted looks
    assert {lab.look for lab in labels["rival"]} == {lab.look for lab in labels["anchor"]}
    for alone, others in (("stranger", ("anchor", "twin", "rival")), ("placebo", ("anchor", "twin", "rival", "stranger"))):
        for other in others:  # the stranger and the placebo (the study's control) share no name and no look
            assert not names[alone] & names[other]
            assert not {lab.look for lab in labels[alone]} & {lab.look for lab in labels[other]}
    base_looks = {lab.look for lab in labels["base"]}
    assert all({lab.look for lab in labels[v]} <= base_looks for v in variants)  # every look pretrained
    twin = load(written["twin"] / "annotations/panoptic_train2017.json")
    anchor = load(written["anchor"] / "annotations/panoptic_train2017.json")
    assert twin["annotations"] != anchor["annotations"] and len(twin["images"]) == 48  # new images, not copies
    # Each one's train split holds rarely the class the other's holds often; val splits hold all alike.
    for variant, rare in (("anchor", "triangle"), ("twin", "circle")):
        counts = {split: thing_counts(written[variant] / f"annotations/panoptic_{split}2017.json")
                  for split in ("train", "val")}
        assert counts["train"][rare] * 4 < min(n for name, n in counts["train"].items() if name != rare)
        assert counts["val"][rare] * 2 > max(counts["val"].values())
    with pytest.raises(ValueError, match=r"draw weights name \['triangel'\], which are not shape labels here"):
        image_scene(np.random.default_rng(0), labels["anchor"], 96, 128, False, 0.0, {"triangel": 0.1})
    again = write_planted(tmp_path / "again", ["rival"])
    assert (again["rival"] / "annotations/panoptic_val2017.json").read_bytes() == \
        (written["rival"] / "annotations/panoptic_val2017.json").read_bytes()
