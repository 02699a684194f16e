"""Typed configs loaded from YAML, with `key=value` overrides from the command line.

Every config is a strict pydantic model: an unknown key, a missing required key or a value of
the wrong type fails with the file and the dotted key path. Configs flatten to a plain
`{dotted.key: value}` dict for MLflow params.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


def absolute_path(path: Path) -> Path:
    """`path` made absolute against the current working directory (`~` expanded), without
    following symlinks. Configs are validated in the driver, where the user ran the command:
    Ray workers run in folders of their own, so a relative path must never reach them."""
    return Path(os.path.abspath(path.expanduser()))


def absolute_location(location: str) -> str:
    """A local folder (or brace pattern) made absolute; a URL (http, s3, gs, ...) as it is."""
    return location if "://" in location else str(absolute_path(Path(location)))


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///relative.db` made absolute (MLflow would resolve it in each process's own
    working directory); any other URI as it is."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(absolute_path(Path(uri.removeprefix(prefix))))
    return uri


# Paths in configs: absolute once validated (see absolute_path).
LocalPath = Annotated[Path, AfterValidator(absolute_path)]


class StrictModel(BaseModel):
    # extra="forbid": a misspelled key must fail, not be ignored. validate_default: defaults
    # go through the same checks (a default path is made absolute like a given one).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class HeldOutSpec(StrictModel):
    """Part of a data set's train split held out as its val split: a fraction of its images or
    videos, or a count of them (datasets/heldout.py chooses which, by id)."""

    fraction: float | None = Field(default=None, gt=0, lt=1)
    count: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> HeldOutSpec:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give fraction (e.g. 0.1) or count (e.g. 200), not both or neither")
        return self


class DatasetSpec(StrictModel):
    """One dataset of a study or training run: where it comes from and how it is sharded."""

    format: str = Field(description="source format name, as `omgseg convert` takes it")
    src: LocalPath | None = Field(
        default=None,
        description="source directory in the format's public layout; omitted = the synthetic "
        "data set of that format, generated on first use",
    )
    shards: Annotated[str, AfterValidator(absolute_location)] | None = Field(
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

    val_from_train: HeldOutSpec | None = Field(
        default=None, description="the val split is this part of the train split, by image or video id, and train "
        "shards leave it out: for a data set whose val split has no annotations (YouTube-VIS); the source's own "
        "val split is then not read")
    variant: str | None = Field(
        default=None, description="with no src: one of the synthetic planted-relation data sets (omgseg.datasets."
        "planted, e.g. anchor or anchor_a) instead of the format's default synthetic data (coco-panoptic only; "
        "docs/datasets.md, 'Planted relations')")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from omgseg.datasets.formats import get_format

        get_format(value)  # raises, listing the known formats
        return value

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str | None) -> str | None:
        from omgseg.datasets.planted import planted_set

        if value is not None:
            planted_set(value)  # raises, listing the known variants
        return value

    @model_validator(mode="after")
    def _tasks_of_the_format(self) -> DatasetSpec:
        if self.shards is not None:
            if self.src is not None:
                raise ValueError("give src (convert here) or shards (converted already), not both")
            if self.val_from_train is not None:
                raise ValueError("val_from_train cuts a val split at conversion; shards are converted already")
            if "{split}" not in self.shards:
                raise ValueError(f"shards must contain {{split}} where the split name goes, got {self.shards!r}")
        if self.variant is not None and (self.src is not None or self.shards is not None or self.format != "coco-panoptic"):
            raise ValueError(f"variant {self.variant!r} is synthetic coco-panoptic data: give it no src or shards, "
                             f"and format coco-panoptic (got {self.format!r})")
        if self.tasks is None:
            return self
        from omgseg.core.structures import Task
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

    root: LocalPath = Field(
        default=Path("outputs/data"),
        description="cache folder: synthetic sources under synth/, shards under shards/",
    )
    synth_seed: int = Field(default=0, description="seed of the synthetic sources")
    datasets: dict[str, DatasetSpec]
    convert_workers: int | None = Field(default=None, ge=1, description="processes converting shards at once; "
                                        "none = one per core")
    read_retries: int = Field(
        default=5, ge=0, description="times a remote shard whose read stops early (a dropped connection) is read "
        "again before the run fails; the stream goes on at the sample it had reached")
    read_retry_backoff: float = Field(default=1.0, ge=0, description="seconds before the first retry, doubled at each next")

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
        split filled in (a URL stays a string), else the conversion cache under root. Data
        sets converted alike from one source (coco and coco_sam: one COCO, other tasks) share
        the folder of the first of them."""
        spec = self.datasets[name]
        if spec.shards is not None:
            location = spec.shards.replace("{split}", split)
            return location if "://" in location else Path(location)
        converted = spec.model_dump(include={"format", "src", "variant", "clip_length", "samples_per_shard",
                                             "val_from_train"})
        owner = next(n for n, s in self.datasets.items() if s.shards is None and s.model_dump(include=set(converted))
                     == converted)
        return self.root / "shards" / owner / split

    def synth_dir(self) -> Path:
        return self.root / "synth" / f"seed{self.synth_seed}"

    def check_annotated_val(self, names: Iterable[str]) -> None:
        """Raise naming the data set and the key to set when one of `names`, whose val split a
        run reads, has a val split without annotations (YouTube-VIS's public one): its metric
        and validation loss would be empty. Synthetic val splits are annotated; a shards
        location is checked when prepared (its manifest counts annotated samples)."""
        from omgseg.datasets.formats import get_format

        for name in names:
            spec = self.datasets[name]
            if spec.src is None or spec.val_from_train is not None:
                continue
            if not get_format(spec.format).annotated(spec.src, "val"):
                raise ValueError(f"data set {name!r}: the val split of {spec.src} ({spec.format}) has no annotations, "
                                 f"so nothing could be measured on it; set data.datasets.{name}.val_from_train "
                                 "(a fraction or a count of train images or videos held out as val)")


class ModelSpec(StrictModel):
    """Which model to train: a preset of omgseg.model.config and its CLIP weights."""

    preset: Literal["tiny", "omgseg_convnext_large"] = "tiny"
    clip_checkpoint: LocalPath | None = Field(
        default=None, description="local open_clip checkpoint of the frozen CLIP; none = random weights"
    )
    clip_pretrained: str | None = Field(
        default=None, description="an open_clip pretrained tag of the preset's CLIP (e.g. laion2b_s29b_b131k_ft_soup), "
        "downloaded and cached by open_clip; instead of clip_checkpoint")
    init_checkpoint: LocalPath | None = Field(
        default=None, description="a model.pt of the same preset whose weights every run starts from (a warm start); "
        "none = the seed's random initial weights")

    @model_validator(mode="after")
    def _one_source_of_clip_weights(self) -> ModelSpec:
        if self.clip_checkpoint is not None and self.clip_pretrained is not None:
            raise ValueError("give clip_checkpoint (a local file) or clip_pretrained (an open_clip tag), not both")
        return self


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
    loader_workers: int | None = Field(
        default=None, ge=0, description="processes that decode samples and make clips, per training worker (0: the "
        "training process itself); none: one fewer than the CPUs a training worker holds (resources.cpus_per_worker). "
        "The batches are the same for any number")
    loader_prefetch: int = Field(default=2, ge=1, description="batches each loader process makes ahead")


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
    compile: bool = Field(default=False, description="torch.compile the model's backbone, pixel decoder and decoder "
                          "before training (OMGSeg.compile_parts): faster steps after a compile of a minute or more")


class Resources(StrictModel):
    """The workers of one training run (one study trial)."""

    workers: int = Field(default=1, ge=1, description="Ray Train workers (a study runs a 1-worker trial in its own process)")
    cpus_per_worker: float = Field(default=1, gt=0)
    use_gpu: bool = Field(default=False, description="one GPU per worker")


class TrackingConfig(StrictModel):
    """Where MLflow records runs: tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite file."""

    tracking_uri: Annotated[str, AfterValidator(absolute_tracking_uri)] | None = None
    experiment: str = "omgseg"


class AffinityConfig(StrictModel):
    """TAG look-ahead affinity between the mixed data sets, measured during training
    (omgseg.platform.training.affinity): the optimizer's own step on one data set's probe batch, and
    its effect on every data set's fixed held-out batch."""

    enabled: bool = Field(default=False, description="probe during training (a study: in the trials on every train data set)")
    every: int = Field(default=10, ge=1, description="probe every N steps")
    batch_size: int = Field(default=4, ge=1, description="clips of a source's probe batch (drawn fresh at every probe)")
    heldout_samples: int = Field(default=8, ge=1, description="val clips of a target's fixed held-out batch")
    forward_batch_size: int | None = Field(
        default=None, ge=1, description="clips per forward pass of a probe (a source's batch, a target's held-out "
        "loss); none: the training batch size. Larger is faster, on a CPU most of all, and needs more memory")
    heldout_maps: Literal["device", "host", "recompute"] = Field(
        default="host", description="where the held-out batches and their frozen CLIP maps are kept between probes: "
        "host (the device holds one batch at a time, whatever the number of data sets), device (no copies, but "
        "every target's maps stay on the device) or recompute (no maps kept, the tower runs at every look-ahead)")


class RunSpec(StrictModel):
    """How one training run trains, whatever it mixes: the body of `omgseg train`'s config,
    and a study's `train:` block (a study sets the mix, the seed and the steps per trial)."""

    model: ModelSpec = ModelSpec()
    batch: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    resources: Resources = Resources()
    steps: int = Field(default=100, ge=1, description="optimizer steps (a study: per data set, see its budget)")
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0, description="worker failures a run survives by resuming")
    eval_every: int = Field(default=0, ge=0, description="evaluate every N steps as well (0: at the end only)")
    eval_samples: int | None = Field(default=None, ge=1, description="cap on val samples per data set for the task metrics")
    val_samples: int | None = Field(default=None, ge=1, description="cap on val samples per data set for the validation "
                                    "loss; none = the whole val split")
    eval_batch_size: int = Field(default=4, ge=1, description="val clips per forward pass at evaluation (task metrics and "
                                 "validation losses); 4 fits the tiny model on a CPU and the paper's on one GPU")
    collective_timeout_s: int = Field(default=3600, ge=60, description="how long a worker of a multi-worker run waits in "
                                      "one collective (an all-reduce, the merge of the evaluation) before the run fails")
    affinity: AffinityConfig = AffinityConfig()
    output_dir: LocalPath = Path("outputs/runs")


def check_evaluation(evaluation: dict[str, list[str]], known: set[str], where: str = "evaluation") -> None:
    """Every evaluated data set is defined and every task is known; raises naming the entry."""
    from omgseg.core.structures import Task

    for name, tasks in evaluation.items():
        if name not in known:
            raise ValueError(f"{where} names data set {name!r} that data.datasets does not define ({sorted(known)})")
        for task in tasks:
            try:
                Task.parse(task)
            except ValueError as err:
                raise ValueError(f"{where}.{name}: {err}") from None


class TrainConfig(RunSpec):
    """A co-training run (`omgseg train`): its data, mix and evaluation, and how it trains."""

    name: str
    data: DataConfig
    mix: dict[str, float] = Field(description="{dataset: ratio}; ratios are normalised, 0 drops a dataset")
    evaluation: dict[str, list[str]] = Field(
        default_factory=dict, description="{dataset: [task, ...]} evaluated on the val split at the end"
    )
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _names_are_known(self) -> TrainConfig:
        known = set(self.data.datasets)
        unknown = sorted(set(self.mix) - known)
        if unknown:
            raise ValueError(f"mix names datasets {unknown} that data.datasets does not define ({sorted(known)})")
        bad = {k: v for k, v in self.mix.items() if not v >= 0}
        if bad:
            raise ValueError(f"mix ratios must be >= 0, got {bad}")
        if not any(v > 0 for v in self.mix.values()):
            raise ValueError(f"mix needs at least one ratio > 0, got {dict(self.mix)}")
        check_evaluation(self.evaluation, known)
        self.data.check_annotated_val(n for n, splits in self.splits_read().items() if "val" in splits)
        return self

    def splits_read(self) -> dict[str, set[str]]:
        """{data set: splits} this run reads: train of every mixed data set, val of every
        evaluated one, and of every mixed one when TAG affinity probes (its held-out batches)."""
        mixed = [n for n, r in self.mix.items() if r > 0]
        probed = mixed if self.affinity.enabled and len(mixed) > 1 else []
        out: dict[str, set[str]] = {n: {"train"} for n in mixed}
        for name in [*self.evaluation, *probed]:
            out.setdefault(name, set()).add("val")
        return out


COMBINATION_KINDS = ("singletons", "pairs", "leave_one_out", "all")

def headline_metrics() -> dict[str, list[str]]:
    """{task: its headline metrics}: a study's secondary targets unless it names others (the
    task table's entries: the headline numbers of OMG-Seg's tables)."""
    from omgseg.platform.tasks import TASKS  # the task table imports torch: only when a study needs it

    return {spec.name: list(spec.headline) for spec in TASKS.values()}


def metric_direction(task: str, metric: str) -> str | None:
    """"higher" or "lower" (which is better) for a metric `task` reports (its task-table entry
    says), None for one it does not. Lower is better for validation losses (any query group)."""
    from omgseg.core.structures import Task
    from omgseg.platform.tasks import TASKS

    if metric == "val_loss":
        return "lower"
    return TASKS[Task.parse(task)].direction(metric)


class SampledSpec(StrictModel):
    """A sampled design: at each seed, `subsets` random subsets of the train data sets (and the
    control), of sizes cycling through `sizes`, balanced so every data set and every pair of
    data sets appears about equally often, different subsets at different seeds
    (omgseg.platform.study.design.balanced_subsets)."""

    subsets: int = Field(ge=1, description="how many subsets at each seed (different ones at different seeds)")
    sizes: list[int] = Field(min_length=1, description="their sizes, cycled through: e.g. [2, 3]")
    seed: int = Field(default=0, description="seed of the draw")


class SampledCombinations(StrictModel):
    """`{sampled: {subsets: K, sizes: [a, b]}}` in `combinations`."""

    sampled: SampledSpec


class MixtureSweep(StrictModel):
    """A ratio sweep: `mixtures` mixtures of all train data sets drawn from a symmetric
    Dirichlet(`concentration`), each trained at every seed (omgseg.platform.study.mixtures)."""

    mixtures: int = Field(ge=1, description="how many mixtures")
    concentration: float = Field(default=1.0, gt=0, description="below 1: mixtures near the simplex's faces "
                                 "(some data sets nearly left out); 1: uniform on the simplex; above 1: near uniform ratios")
    seed: int = Field(default=0, description="seed of the draws")


class MixingConfig(StrictModel):
    """How each combination's mix is made: a policy, and explicit ratios for named combinations;
    `sampled` adds a ratio sweep."""

    policy: Literal["equal", "proportional"] = Field(
        default="equal", description="equal ratios, or proportional to each data set's train samples")
    explicit: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='{label: {coco: 2, vipseg: 1}}: the ratios of the combination of exactly '
        'those data sets (the label only names it, e.g. "coco+vipseg"); overrides the policy')
    sampled: MixtureSweep | None = Field(
        default=None, description="{mixtures: K, concentration: a}: K mixtures of all train data sets on the "
        "simplex, trials beside the combinations' (what omgseg recommend fits)")


class Scheduling(StrictModel):
    """How a study runs its trials."""

    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="none = as many as the CPUs (or GPUs) hold: floor(total / per trial)")
    max_retries: int = Field(default=1, ge=0, description="times Ray Tune retries a failed trial")
    seconds_per_step: float | None = Field(
        default=None, gt=0, description="measured or expected time of a training step, for --dry-run's cost estimate")
    seconds_per_forward_clip: float | None = Field(
        default=None, gt=0, description="time of one clip's forward pass without gradients (evaluation, the TAG "
        "probes' held-out losses), for --dry-run")
    seconds_per_converted_sample: float | None = Field(
        default=None, gt=0, description="time to convert one source sample to shards, for --dry-run")
    split_samples: dict[str, dict[str, int]] | None = Field(
        default=None, description="{data set: {split: samples}}: the sizes --dry-run assumes before the data are "
        "converted (a video counts its clips of clip_length frames)")


class PlantedEffect(StrictModel):
    """A known effect of one train data set on another, by construction of the data."""

    source: str
    target: str
    effect: Literal["helps", "hurts", "none"]


class PretrainSpec(StrictModel):
    """A run a study trains once, before its trials, with the `train:` spec; every trial then
    starts from its weights (model.init_checkpoint)."""

    mix: dict[str, float] = Field(description="{dataset: ratio} of data sets of data.datasets that are not train data sets")
    steps: int = Field(ge=1, description="its optimizer steps")


class RecommendConfig(StrictModel):
    """Recommendations made at the study's end (omgseg.platform.study.recommend)."""

    objectives: list[str] = Field(min_length=1, description="each: DATASET, DATASET/TASK/METRIC, all, or 'a:2,b:1'")


class VerifyConfig(StrictModel):
    """What `omgseg study ... --verify` trains beside the recommendation, the uniform mixture of
    all train data sets and the target alone (omgseg.platform.study.verify)."""

    baselines: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="{label: {data set: ratio}}: more baselines, e.g. hand-set ratios")


class StudyConfig(StrictModel):
    """A co-training study: one training spec (`train:`), and its variations (which data set
    combinations, with which mixes, seeds and exposure budget), and what to measure."""

    name: str
    data: DataConfig
    train: RunSpec = RunSpec()
    train_datasets: list[str] | None = Field(
        default=None, description="the data sets combined for training; none = all of data.datasets "
        "(others are evaluated only, e.g. an open-vocabulary target)")
    combinations: list[str | list[str] | SampledCombinations] = Field(
        default_factory=lambda: ["singletons", "pairs"],
        description="singletons, pairs, leave_one_out, all, explicit lists of data set names, or "
        "{sampled: {subsets: K, sizes: [a, b]}} (a sampled design, with a surrogate per target)")
    mixing: MixingConfig = MixingConfig()
    budget: Literal["per_dataset", "total"] = Field(
        default="per_dataset", description="per_dataset: a trial on k data sets trains k x train.steps steps, so every "
        "data set sees the same samples in every combination (the transfer question); total: every trial trains "
        "train.steps steps (the substitution question: what replacing part of a data set's samples does)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    evaluation: dict[str, list[str]] | None = Field(
        default=None, description="{data set: [task, ...]} every trial is evaluated on (val split); "
        "none = every train data set on the tasks it supervises")
    metrics: dict[str, list[str]] = Field(
        default_factory=headline_metrics,
        description="secondary targets: {task or data set/task: [metric, ...]} (the primary targets are the "
        "validation losses of every evaluated data set)")
    affinity_seeds: int | None = Field(
        default=None, ge=1, description="how many seeds (the first ones) probe TAG affinity (train.affinity) in their "
        "trial on every train data set; none = every seed")
    planted: list[PlantedEffect] | None = Field(
        default=None, description="the known effect of every ordered pair of train data sets, for a study on data "
        "made with them (docs/datasets.md, planted relations)")
    control: str | None = Field(
        default=None, description="a data set of data.datasets, not a train data set, related to none of them: "
        "each train data set is also trained with it alone, and the influence table gets `controlled` rows, "
        "{source, target} against {target, control}, in which what any added data set does (more steps, more names) "
        "cancels (docs/studies.md, 'A control')")
    pretrain: PretrainSpec | None = Field(
        default=None, description="train once on other data sets first and start every trial from that model: "
        "the trials then measure what the train data sets add to skills every data set teaches")
    recommend: RecommendConfig | None = Field(
        default=None, description="objectives to recommend mixtures for at the study's end (omgseg recommend)")
    verify: VerifyConfig | None = Field(default=None, description="baselines of `--verify` beside the default ones")
    arms: dict[str, dict[str, float]] | None = Field(
        default=None, description="{label: {data set: ratio}}: trained at every seed instead of the combinations; "
        "what `--verify` writes into its study's config (the recommendation and its baselines)")
    scheduling: Scheduling = Scheduling()
    tracking: TrackingConfig = TrackingConfig(experiment="omgseg-studies")

    @field_validator("combinations", mode="before")
    @classmethod
    def _one_sampled_block(cls, value):
        """`combinations: {sampled: ...}` is the one-item list of it."""
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _names_are_known(self) -> StudyConfig:
        from omgseg.core.structures import Task

        known = list(self.data.datasets)
        unknown = sorted(set(self.train_datasets or ()) - set(known))
        if unknown:
            raise ValueError(f"train_datasets names {unknown} that data.datasets does not define ({sorted(known)})")
        for item in self.combinations:
            if isinstance(item, str):
                if item not in COMBINATION_KINDS:
                    raise ValueError(f"combinations: unknown kind {item!r}; use {', '.join(COMBINATION_KINDS)}, a list of "
                                     "data sets or {sampled: {subsets: K, sizes: [a, b]}}")
                continue
            if isinstance(item, SampledCombinations):
                pool = len(self.trained()) + (self.control is not None)
                bad_sizes = [k for k in item.sampled.sizes if not 1 <= k <= pool]
                if bad_sizes:
                    raise ValueError(f"combinations.sampled.sizes: {bad_sizes} must be between 1 and {pool} (the train "
                                     "data sets and the control)")
                continue
            bad = sorted(set(item) - set(self.trained()))
            if bad or not item or len(set(item)) != len(item):
                raise ValueError(f"combinations: {item} must name distinct train data sets ({self.trained()})")
        check_evaluation(self.evaluation or {}, set(known))
        for key, metrics in self.metrics.items():  # a task, or "<data set>/<task>" for one data set's targets
            dataset, _, task = key.rpartition("/")
            try:
                Task.parse(task)
            except ValueError as err:
                raise ValueError(f"metrics.{key}: {err}") from None
            if dataset and dataset not in known:
                raise ValueError(f"metrics.{key}: unknown data set {dataset!r} ({sorted(known)})")
            for metric in metrics:
                if metric_direction(task, metric) is None:
                    raise ValueError(f"metrics.{key}: metric {metric!r} has no known direction (higher or lower is "
                                     "better); use a metric the evaluators report (docs/evaluation.md)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if len(self.seeds) < 2:
            raise ValueError(f"seeds: the influence table's intervals need at least 2 seeds, got {self.seeds}")
        seen: dict[frozenset, str] = {}
        for label, ratios in self.mixing.explicit.items():  # the ratios' keys are the combination, the label names it
            bad = sorted(set(ratios) - set(self.trained()) - {self.control})
            if bad or any(not r >= 0 for r in ratios.values()) or not any(ratios.values()):
                raise ValueError(f"mixing.explicit.{label}: needs a ratio >= 0 (not all 0) for each data set of the "
                                 f"combination, all train data sets ({self.trained()}), got {ratios}")
            if frozenset(ratios) in seen:
                raise ValueError(f"mixing.explicit.{label}: the same data sets as mixing.explicit.{seen[frozenset(ratios)]}")
            seen[frozenset(ratios)] = label
        self._check_planted()
        for where, mixes in (("arms", self.arms or {}), ("verify.baselines", self.verify.baselines if self.verify else {})):
            for label, ratios in mixes.items():
                bad = sorted(set(ratios) - set(self.trained()))
                if bad or not ratios or any(not r >= 0 for r in ratios.values()) or not any(ratios.values()):
                    raise ValueError(f"{where}.{label}: needs ratios >= 0 (not all 0) of train data sets "
                                     f"({self.trained()}), got {ratios}")
        if self.control is not None:
            if self.control not in known:
                raise ValueError(f"control: {self.control!r} is not a data set of data.datasets ({sorted(known)})")
            if self.control in self.trained():
                raise ValueError(f"control: {self.control!r} is a train data set; name one that train_datasets leaves "
                                 "out (set train_datasets)")
        if self.pretrain is not None:
            bad = sorted(set(self.pretrain.mix) - set(known))
            if bad:
                raise ValueError(f"pretrain.mix names data sets {bad} that data.datasets does not define ({sorted(known)})")
            shared = sorted(set(self.pretrain.mix) & set(self.trained()))
            if shared:
                raise ValueError(f"pretrain.mix: {shared} are train data sets; pretrain on data sets the trials do not "
                                 "combine (set train_datasets)")
            if self.train.model.init_checkpoint is not None:
                raise ValueError("give pretrain or train.model.init_checkpoint, not both")
        self.data.check_annotated_val(n for n, splits in self.splits_read().items() if "val" in splits)
        return self

    def _check_planted(self) -> None:
        if self.planted is None:
            return
        trained = self.trained()
        seen = {}
        for k, item in enumerate(self.planted):
            for role in ("source", "target"):
                name = getattr(item, role)
                if name not in trained:
                    raise ValueError(f"planted[{k}].{role}: {name!r} is not a train data set ({trained})")
            if item.source == item.target:
                raise ValueError(f"planted[{k}]: source and target are both {item.source!r}")
            if (item.source, item.target) in seen:
                raise ValueError(f"planted[{k}]: the pair {item.source} -> {item.target} is stated twice")
            seen[(item.source, item.target)] = item.effect
        missing = [f"{a} -> {b}" for a in trained for b in trained if a != b and (a, b) not in seen]
        if missing:
            raise ValueError(f"planted must state every ordered pair of train data sets; missing: {missing}")

    def trained(self) -> list[str]:
        """The data sets that take part in training combinations, in config order."""
        return [n for n in self.data.datasets if self.train_datasets is None or n in self.train_datasets]

    def evaluated(self) -> dict[str, list[str]]:
        """{data set: tasks} every trial is evaluated on."""
        if self.evaluation is not None:
            return {k: list(v) for k, v in self.evaluation.items()}
        return {n: list(self.data.datasets[n].supervised_tasks()) for n in self.trained()}

    def splits_read(self) -> dict[str, set[str]]:
        """{data set: splits} the study's runs read: train of every data set a trial or the
        pretraining trains on, val of every evaluated one, and of every train data set when
        TAG affinity probes (the held-out batches of the trial on all of them)."""
        pretrained = [n for n, r in self.pretrain.mix.items() if r > 0] if self.pretrain else []
        trained = [*self.trained(), *([self.control] if self.control else []), *pretrained]
        probed = self.trained() if self.train.affinity.enabled and len(self.trained()) > 1 else []
        out: dict[str, set[str]] = {n: {"train"} for n in trained}
        for name in [*self.evaluated(), *probed]:
            out.setdefault(name, set()).add("val")
        return out


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


def load_run_or_study(path: Path | str, overrides: list[str] = ()) -> TrainConfig | StudyConfig:
    """A training config (it has `mix`) or a study config, whichever the file is."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    model = TrainConfig if isinstance(raw, dict) and "mix" in raw else StudyConfig
    return load_config(model, path, overrides)


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
