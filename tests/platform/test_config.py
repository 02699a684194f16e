"""Typed configs: strict loading, overrides, and errors that name the file and the key."""

import pytest
import yaml

from omgseg.platform.config import (
    ConfigError,
    StudyConfig,
    apply_overrides,
    flatten,
    load_config,
    parse_override,
)

GOOD = {
    "name": "s",
    "data": {"root": "out", "datasets": {"coco": {"format": "coco-panoptic"}, "yv": {"format": "ytvis", "clip_length": 4}}},
}


def _write(tmp_path, obj, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj))
    return path


def test_load_good_config(tmp_path):
    config = load_config(StudyConfig, _write(tmp_path, GOOD))
    assert config.data.datasets["yv"].clip_length == 4
    assert config.data.datasets["coco"].src is None
    assert config.data.shard_dir("coco", "val").parts[-3:] == ("shards", "coco", "val")


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    bad = {**GOOD, "data": {**GOOD["data"], "datasets": {"coco": {"format": "coco-panoptic", "clip_lenght": 2}}}}
    path = _write(tmp_path, bad, "typo.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(StudyConfig, path)
    msg = str(err.value)
    assert "typo.yaml" in msg and "data.datasets.coco.clip_lenght" in msg
    assert "clip_length" in msg  # the allowed keys are listed


def test_wrong_type_names_key(tmp_path):
    bad = {**GOOD, "data": {**GOOD["data"], "synth_seed": "zero"}}
    with pytest.raises(ConfigError, match=r"data\.synth_seed"):
        load_config(StudyConfig, _write(tmp_path, bad))


def test_unknown_format_lists_known(tmp_path):
    bad = {**GOOD, "data": {**GOOD["data"], "datasets": {"x": {"format": "kitti"}}}}
    with pytest.raises(ConfigError, match=r"kitti.*coco-panoptic"):
        load_config(StudyConfig, _write(tmp_path, bad))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(StudyConfig, tmp_path / "nope.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(StudyConfig, path)


def test_overrides_parse_yaml_values_and_create_keys(tmp_path):
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    out = apply_overrides({"a": {"b": 1}}, ["a.c.d=x", "a.b=2.5"], "src")
    assert out == {"a": {"b": 2.5, "c": {"d": "x"}}}
    config = load_config(StudyConfig, _write(tmp_path, GOOD), ["data.synth_seed=7", "data.datasets.yv.clip_length=2"])
    assert config.data.synth_seed == 7 and config.data.datasets["yv"].clip_length == 2


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1"])
def test_bad_override_form(text):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override(text)


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'name' is not a mapping"):
        apply_overrides({"name": "s"}, ["name.x=1"], "f.yaml")


def test_override_validation_error_names_file(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*data\.datasets\.coco\.clip_length"):
        load_config(StudyConfig, _write(tmp_path, GOOD), ["data.datasets.coco.clip_length=0"])


def test_flatten_gives_dotted_leaves(tmp_path):
    flat = flatten(load_config(StudyConfig, _write(tmp_path, GOOD)))
    assert flat["name"] == "s"
    assert flat["data.datasets.yv.clip_length"] == 4
    assert flat["data.datasets.coco.format"] == "coco-panoptic"
