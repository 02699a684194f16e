"""Typed configs loaded from YAML, with `key=value` overrides from the command line.

Every config is a strict pydantic model: an unknown key, a missing required key or a value of
the wrong type fails with the file and the dotted key path. Configs flatten to a plain
`{dotted.key: value}` dict for MLflow params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SPLITS = ("train", "val")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


class StrictModel(BaseModel):
    # extra="forbid": a misspelled key must fail, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(StrictModel):
    """One dataset of a study or training run: where it comes from and how it is sharded."""

    format: str = Field(description="source format name, as `omgseg convert` takes it")
    src: Path | None = Field(
        default=None,
        description="source directory in the format's public layout; omitted = the synthetic "
        "data set of that format, generated on first use",
    )
    clip_length: int | None = Field(
        default=None, ge=1, description="cut videos into clips of this many frames"
    )
    samples_per_shard: int = Field(default=64, ge=1)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from omgseg.datasets.formats import get_format

        get_format(value)  # raises, listing the known formats
        return value


class DataConfig(StrictModel):
    """The datasets of a run and where their sources and shards are cached."""

    root: Path = Field(
        default=Path("outputs/data"),
        description="cache folder: synthetic sources under synth/, shards under shards/",
    )
    synth_seed: int = Field(default=0, description="seed of the synthetic sources")
    datasets: dict[str, DatasetSpec]
    splits: tuple[Literal["train", "val"], ...] = SPLITS

    @field_validator("datasets")
    @classmethod
    def _not_empty(cls, value: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        if not value:
            raise ValueError("at least one dataset is needed")
        for name in value:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"dataset name {name!r} must be letters, digits and '_'")
        return value

    def shard_dir(self, name: str, split: str) -> Path:
        return (self.root / "shards" / name / split).resolve()

    def synth_dir(self) -> Path:
        return (self.root / "synth" / f"seed{self.synth_seed}").resolve()


class StudyConfig(StrictModel):
    """A co-training study. So far: its name and its data; training and trial settings join
    when the training platform and the study runner land (issues 5 and 6)."""

    name: str
    data: DataConfig


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so `3` is an int)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Return a copy of `raw` with each `dotted.key=value` set (intermediate dicts created)."""
    out = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"{source}: override {text!r}: {where!r} is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def load_config(model: type[ConfigT], path: Path | str, overrides: list[str] = ()) -> ConfigT:
    """Read a YAML file into `model`, applying overrides; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides), str(path))
    return validate_config(model, raw, str(path))


def validate_config(model: type[ConfigT], raw: dict, source: str) -> ConfigT:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top level>"
            if e["type"] == "extra_forbidden":
                allowed = _allowed_keys(model, e["loc"][:-1])
                lines.append(f"  {key}: unknown key (allowed here: {', '.join(allowed)})")
            else:
                lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"{source}: invalid {model.__name__}:\n" + "\n".join(lines)) from None


def flatten(config: BaseModel) -> dict[str, object]:
    """`{dotted.key: value}` of every leaf, for MLflow params."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", config.model_dump(mode="json"))
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` inside `model` (for error messages)."""
    current: type[BaseModel] | None = model
    inside_mapping = False  # the next loc part is a user-chosen key of a dict field
    for part in loc:
        if current is None:
            return []
        if inside_mapping:
            inside_mapping = False
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        inside_mapping = getattr(field.annotation, "__origin__", None) is dict
        current = _model_in(field.annotation)
    return sorted(current.model_fields) if current is not None else []


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation like `X`, `X | None` or `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
