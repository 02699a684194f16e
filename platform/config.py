"""Typed configs loaded from YAML, with `key=value` overrides from the command line.

Every config is a strict pydantic model: an unknown key, a missing required key or a value of
the wrong type fails with the file and the dotted key path. Configs flatten to a plain
`{dotted.key: value}` dict for MLflow params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    shards: str | None = Field(
        default=None,
        description="shards made already: a folder or URL with {split} in it (https://host/coco/{split}, "
        "s3://bucket/coco/{split}), optionally ending in a brace pattern of shard names "
        "(.../{split}/shard-{000000..000127}.tar); manifest.json and meta.json are read beside them. "
        "Nothing is converted then; src must be omitted",
    )
    clip_length: int | None = Field(
        default=None, ge=1, description="cut videos into clips of this many frames"
    )
    samples_per_shard: int = Field(default=64, ge=1)
    tasks: tuple[str, ...] | None = Field(
        default=None,
        description="the tasks this data set supervises in training; omitted = every task its format "
        "annotates (e.g. coco-panoptic: panoptic, instance, semantic, interactive)",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from omgseg.datasets.formats import get_format

        get_format(value)  # raises, listing the known formats
        return value

    @model_validator(mode="after")
    def _tasks_of_the_format(self) -> DatasetSpec:
        if self.shards is not None:
            if self.src is not None:
                raise ValueError("give src (convert here) or shards (converted already), not both")
            if "{split}" not in self.shards:
                raise ValueError(f"shards must contain {{split}} where the split name goes, got {self.shards!r}")
        if self.tasks is None:
            return self
        from omgseg.datasets.clip import Task
        from omgseg.datasets.formats import get_format

        annotated = {t.value for t in get_format(self.format).tasks}
        for task in self.tasks:
            Task.parse(task)  # raises, listing the known tasks
        extra = sorted(set(self.tasks) - annotated)
        if extra:
            raise ValueError(f"format {self.format!r} does not annotate tasks {extra} (it annotates {sorted(annotated)})")
        if not self.tasks:
            raise ValueError("tasks must name at least one task (omit it for all the format annotates)")
        return self

    def supervised_tasks(self) -> tuple[str, ...]:
        """The tasks training supervises on this data set."""
        from omgseg.datasets.formats import get_format

        return self.tasks if self.tasks is not None else tuple(t.value for t in get_format(self.format).tasks)


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

    def shard_dir(self, name: str, split: str) -> Path | str:
        """Where the shards of (data set, split) are: the data set's `shards` location with the
        split filled in (a URL stays a string), else the conversion cache under root."""
        spec = self.datasets[name]
        if spec.shards is not None:
            location = spec.shards.replace("{split}", split)
            return location if "://" in location else Path(location).resolve()
        return (self.root / "shards" / name / split).resolve()

    def synth_dir(self) -> Path:
        return (self.root / "synth" / f"seed{self.synth_seed}").resolve()


class ModelSpec(StrictModel):
    """Which model to train: a preset of omgseg.model.config and its CLIP weights."""

    preset: Literal["tiny", "omgseg_convnext_large"] = "tiny"
    clip_checkpoint: Path | None = Field(
        default=None, description="local open_clip checkpoint of the frozen CLIP; none = random weights"
    )


class BatchConfig(StrictModel):
    """How samples become training clips and batches (per worker)."""

    batch_size: int = Field(default=2, ge=1, description="clips per worker and step")
    frames: int = Field(default=2, ge=1, description="frames per training clip; images are repeated")
    crop: tuple[int, int] = Field(default=(96, 128), description="(height, width) of every clip")
    scale_range: tuple[float, float] = (0.8, 1.25)
    hflip_prob: float = Field(default=0.5, ge=0, le=1)
    prompts_per_clip: int = Field(default=4, ge=0, description="prompts sampled for interactive and VOS data")
    point_prob: float = Field(default=0.5, ge=0, le=1, description="share of point prompts (the rest are boxes)")
    positive_points: int = Field(default=2, ge=1, description="point prompts get 1 to this many positive clicks")
    negative_points: int = Field(default=1, ge=0)
    shuffle_buffer: int = Field(default=32, ge=0)


class OptimizerConfig(StrictModel):
    """AdamW with linear warm-up and step decay (the paper's schedule, shortened)."""

    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    grad_clip: float = Field(default=0.01, gt=0, description="max L2 norm of all gradients")
    warmup_steps: int = Field(default=500, ge=0)
    milestones: tuple[float, ...] = Field(
        default=(8 / 12, 11 / 12), description="fractions of the run where the lr is multiplied by gamma"
    )
    gamma: float = Field(default=0.1, gt=0)
    amp: bool = Field(default=True, description="bfloat16 autocast where the device supports it (CUDA)")


class ScalingSpec(StrictModel):
    """Ray Train workers."""

    workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    use_gpu: bool = False


class TrackingConfig(StrictModel):
    """Where MLflow records runs: tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite file."""

    tracking_uri: str | None = None
    experiment: str = "omgseg"


class AffinityConfig(StrictModel):
    """Inter-task affinity (TAG look-ahead) between the mixed data sets, measured in training."""

    every: int = Field(default=0, ge=0, description="probe every N steps (0: off)")
    lookahead_lr: float | None = Field(default=None, gt=0, description="look-ahead step size; none = optimizer.lr")


class TrainConfig(StrictModel):
    """A co-training run: data, mix, model, schedule, scaling, checkpoints, evaluation."""

    name: str
    data: DataConfig
    mix: dict[str, float] = Field(description="{dataset: ratio}; ratios are normalised, 0 drops a dataset")
    model: ModelSpec = ModelSpec()
    batch: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scaling: ScalingSpec = ScalingSpec()
    tracking: TrackingConfig = TrackingConfig()
    steps: int = Field(default=300, ge=1, description="optimizer steps")
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker failures a run survives by resuming")
    eval_every: int = Field(default=0, ge=0, description="evaluate every N steps as well (0: at the end only)")
    eval_datasets: dict[str, list[str]] = Field(
        default_factory=dict, description="{dataset: [task, ...]} evaluated on the val split"
    )
    eval_samples: int | None = Field(default=None, ge=1, description="cap on val samples per dataset")
    affinity: AffinityConfig = AffinityConfig()
    output_dir: Path = Path("outputs/runs")

    @model_validator(mode="after")
    def _names_are_known(self) -> TrainConfig:
        known = set(self.data.datasets)
        for what, names in (("mix", self.mix), ("eval_datasets", self.eval_datasets)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"{what} names datasets {unknown} that data.datasets does not define ({sorted(known)})")
        bad = {k: v for k, v in self.mix.items() if not v >= 0}
        if bad:
            raise ValueError(f"mix ratios must be >= 0, got {bad}")
        if not any(v > 0 for v in self.mix.values()):
            raise ValueError(f"mix needs at least one ratio > 0, got {dict(self.mix)}")
        from omgseg.datasets.clip import Task

        for tasks in self.eval_datasets.values():
            for task in tasks:
                Task.parse(task)  # raises, listing the known tasks
        return self


COMBINATION_KINDS = ("singletons", "pairs", "leave_one_out", "all")

# The metric of each task that influence and correlation tables use unless a study names others
# (the headline numbers of OMG-Seg's tables; all are higher-is-better).
HEADLINE_METRICS = {
    "panoptic": ("PQ",), "instance": ("AP",), "semantic": ("mIoU",), "interactive": ("mIoU@1",),
    "video_panoptic": ("VPQ",), "video_instance": ("AP",), "vos": ("J&F",),
}


class StudyTrainSpec(StrictModel):
    """What every trial trains: the settings of `omgseg train` that do not vary between trials."""

    model: ModelSpec = ModelSpec()
    batch: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = Field(default=100, ge=1, description="optimizer steps per trial")
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=1, ge=1)
    max_failures: int = Field(default=1, ge=0, description="worker failures a trial survives by resuming")
    eval_samples: int | None = Field(default=8, ge=1, description="cap on val samples per evaluated data set")


class MixingConfig(StrictModel):
    """Mixing ratios of each combination: a policy, and explicit ratios for named combinations."""

    policy: Literal["equal", "proportional"] = Field(
        default="equal", description="equal ratios, or proportional to each data set's train samples")
    explicit: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='{"coco+vipseg": {coco: 2, vipseg: 1}}: overrides the policy')


class TrialResources(StrictModel):
    """Resources of one trial, and how many trials run at once."""

    workers: int = Field(default=1, ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(default=1, gt=0)
    use_gpu: bool = Field(default=False, description="one GPU per worker")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="none = as many as the CPUs (or GPUs) hold: floor(total / per trial)")
    max_retries: int = Field(default=1, ge=0, description="times Ray Tune retries a failed trial")
    seconds_per_step: float | None = Field(
        default=None, gt=0, description="measured or expected time of a step, for --dry-run's cost estimate")


class StudyAffinityConfig(StrictModel):
    """TAG look-ahead affinity, measured in the trials that co-train every study data set."""

    enabled: bool = True
    every: int = Field(default=5, ge=1, description="probe every N steps")
    # An SGD look-ahead at Adam's learning rate overshoots on raw gradients (measured: the
    # tiny model's own-batch loss rises at 1e-3 and falls at 1e-4), so this is set apart.
    lookahead_lr: float | None = Field(default=1e-4, gt=0, description="look-ahead step; none = optimizer.lr")


class StudyConfig(StrictModel):
    """A co-training study: which data set combinations to train, how, and what to measure."""

    name: str
    data: DataConfig
    train_datasets: list[str] | None = Field(
        default=None, description="the data sets combined for training; none = all of data.datasets "
        "(others are evaluated only, e.g. an open-vocabulary target)")
    combinations: list[str | list[str]] = Field(
        default_factory=lambda: ["singletons", "pairs"],
        description="singletons, pairs, leave_one_out, all, or explicit lists of data set names")
    mixing: MixingConfig = MixingConfig()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: StudyTrainSpec = StudyTrainSpec()
    evaluation: dict[str, list[str]] | None = Field(
        default=None, description="{data set: [task, ...]} every trial is evaluated on (val split); "
        "none = every train data set on the tasks it supervises")
    metrics: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in HEADLINE_METRICS.items()},
        description="{task or data set/task: [metric, ...]} used by the influence and correlation tables")
    resources: TrialResources = TrialResources()
    affinity: StudyAffinityConfig = StudyAffinityConfig()
    tracking: TrackingConfig = TrackingConfig(experiment="omgseg-studies")

    @model_validator(mode="after")
    def _names_are_known(self) -> StudyConfig:
        from omgseg.datasets.clip import Task

        known = list(self.data.datasets)
        unknown = sorted(set(self.train_datasets or ()) - set(known))
        if unknown:
            raise ValueError(f"train_datasets names {unknown} that data.datasets does not define ({sorted(known)})")
        for item in self.combinations:
            if isinstance(item, str):
                if item not in COMBINATION_KINDS:
                    raise ValueError(f"combinations: unknown kind {item!r}; use {', '.join(COMBINATION_KINDS)} or a list of data sets")
                continue
            bad = sorted(set(item) - set(self.trained()))
            if bad or not item or len(set(item)) != len(item):
                raise ValueError(f"combinations: {item} must name distinct train data sets ({self.trained()})")
        for name, tasks in (self.evaluation or {}).items():
            if name not in known:
                raise ValueError(f"evaluation names data set {name!r} that data.datasets does not define ({sorted(known)})")
            for task in tasks:
                Task.parse(task)
        for key in self.metrics:  # a task, or "<data set>/<task>" for one data set's targets
            dataset, _, task = key.rpartition("/")
            Task.parse(task)
            if dataset and dataset not in known:
                raise ValueError(f"metrics.{key}: unknown data set {dataset!r} ({sorted(known)})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        for combo, ratios in self.mixing.explicit.items():
            names = combo.split("+")
            if sorted(ratios) != sorted(names) or any(not r >= 0 for r in ratios.values()) or not any(ratios.values()):
                raise ValueError(f"mixing.explicit.{combo}: needs a ratio >= 0 for each of {names} (not all 0), got {ratios}")
        return self

    def trained(self) -> list[str]:
        """The data sets that take part in training combinations, in config order."""
        return [n for n in self.data.datasets if self.train_datasets is None or n in self.train_datasets]

    def evaluated(self) -> dict[str, list[str]]:
        """{data set: tasks} every trial is evaluated on."""
        if self.evaluation is not None:
            return {k: list(v) for k, v in self.evaluation.items()}
        return {n: list(self.data.datasets[n].supervised_tasks()) for n in self.trained()}


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
            elif not e["loc"]:  # a check across keys: the input is the whole config, not worth echoing
                lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"{source}: invalid {model.__name__}:\n" + "\n".join(lines)) from None


def flatten(config: BaseModel | dict) -> dict[str, object]:
    """`{dotted.key: value}` of every leaf (of a config, or of its JSON dict), for MLflow
    params and for comparing configs key by key."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", config if isinstance(config, dict) else config.model_dump(mode="json"))
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
