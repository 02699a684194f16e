"""What a study costs before it runs: each trial's training, TAG probes and evaluation, the
pretraining and the data conversion, in seconds, trial-hours and GPU-hours.

The unit costs are the config's `scheduling` keys (measured on the machine that will run it,
or assumed; omgseg.platform.config.Scheduling):

    training   = steps x seconds_per_step
    probes     = probes x [n x seconds_per_step x affinity.batch_size / batch.batch_size
                           + (1 + n) x n x affinity.heldout_samples x seconds_per_forward_clip]
                 (a probe every affinity.every steps of a probing trial on n data sets: one
                 look-ahead step per source, each set of weights scored on every one of the n
                 held-out batches, the reference step's included)
    evaluation = per evaluated data set, (its val clips for the validation losses, up to
                 train.val_samples, + its val clips for each task's metrics, up to
                 train.eval_samples, the interactive task's up to 20 clicks each)
                 x seconds_per_forward_clip
    conversion = every (data set, split)'s samples x seconds_per_converted_sample, once per data
                 folder (cached afterwards); on CPUs, so not in the GPU-hours

A part whose unit cost is not given, or whose sample counts are not known yet (val clips and
conversion need the data sets' sizes: `omgseg prepare` first), is None, and the dry run says
which key is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omgseg.core.structures import Task
from omgseg.platform.config import StudyConfig


@dataclass(frozen=True)
class TrialCost:
    trial_id: str
    training_s: float | None
    probes_s: float | None
    evaluation_s: float | None

    @property
    def total_s(self) -> float | None:
        parts = (self.training_s, self.probes_s, self.evaluation_s)
        return None if any(p is None for p in parts) else sum(parts)

    def to_json(self) -> dict:
        return {"trial_id": self.trial_id, "training_s": self.training_s, "probes_s": self.probes_s,
                "evaluation_s": self.evaluation_s, "total_s": self.total_s}


@dataclass(frozen=True)
class StudyCost:
    trials: list[TrialCost]
    pretraining_s: float | None
    conversion_s: float | None  # CPU seconds, once per data folder
    gpus_per_trial: int
    missing: list[str] = field(default_factory=list)  # what a None part needs

    def _sum(self, part: str) -> float | None:
        values = [getattr(t, part) for t in self.trials]
        return None if any(v is None for v in values) else sum(values)

    def to_json(self) -> dict:
        parts = {name: self._sum(f"{name}_s") for name in ("training", "probes", "evaluation")}
        trials_s = None if any(v is None for v in parts.values()) or self.pretraining_s is None \
            else sum(parts.values()) + self.pretraining_s
        hours = None if trials_s is None else trials_s / 3600
        return {
            "seconds": {**parts, "pretraining": self.pretraining_s, "conversion_cpu": self.conversion_s},
            "trial_hours": hours,
            "gpu_hours": None if hours is None else hours * self.gpus_per_trial,
            "per_trial": [t.to_json() for t in self.trials],
            "missing": self.missing,
        }


def _probes(config: StudyConfig, steps: int, n: int) -> float | None:
    rate, forward = config.scheduling.seconds_per_step, config.scheduling.seconds_per_forward_clip
    if rate is None or forward is None:
        return None
    affinity = config.train.affinity
    probe = (n * rate * affinity.batch_size / config.train.batch.batch_size
             + (1 + n) * n * affinity.heldout_samples * forward)
    return steps // affinity.every * probe


def _evaluation(config: StudyConfig, val_sizes: dict[str, int] | None) -> float | None:
    from omgseg.platform.tasks import TASKS  # the task table imports torch: only when evaluation is costed

    forward = config.scheduling.seconds_per_forward_clip
    if forward is None:
        return None
    clips = 0
    for name, tasks in config.evaluated().items():
        size = val_sizes.get(name) if val_sizes is not None else None
        caps = (config.train.val_samples, config.train.eval_samples)  # None: the whole val split
        losses, metrics = (cap if size is None else size if cap is None else min(cap, size) for cap in caps)
        if losses is None or metrics is None:
            return None
        clips += losses + sum(metrics * TASKS[Task.parse(t)].forwards_per_clip for t in tasks)
    return clips * forward


def prepared_sizes(config: StudyConfig) -> dict[str, dict[str, int]] | None:
    """{data set: {split: samples}} of the splits the study reads (StudyConfig.splits_read), from
    the manifests of converted local shard folders, else
    the config's assumed `scheduling.split_samples`, else None (the dry run prepares nothing)."""
    from omgseg.datasets.manifest import MANIFEST, read_manifest

    sizes: dict[str, dict[str, int]] = {}
    for name, splits in sorted(config.splits_read().items()):
        for split in sorted(splits):
            folder = config.data.shard_dir(name, split)
            if not isinstance(folder, Path) or not (folder / MANIFEST).is_file():
                return config.scheduling.split_samples
            sizes.setdefault(name, {})[split] = read_manifest(folder).total_samples
    return sizes


def study_cost(config: StudyConfig, trials: list, sizes: dict[str, dict[str, int]] | None = None) -> StudyCost:
    """The cost of `trials` (omgseg.platform.study.plan.Trial) under `config`'s unit costs;
    `sizes`: {data set: {split: samples}} when the data are prepared."""
    scheduling = config.scheduling
    missing = [key for key in ("seconds_per_step", "seconds_per_forward_clip", "seconds_per_converted_sample")
               if getattr(scheduling, key) is None]
    val_sizes = {name: splits["val"] for name, splits in sizes.items() if "val" in splits} if sizes else None
    if (config.train.val_samples is None or config.train.eval_samples is None) and val_sizes is None:
        missing.append("the val splits' sizes (omgseg prepare first, or scheduling.split_samples)")
    evaluation = _evaluation(config, val_sizes)
    rate = scheduling.seconds_per_step
    costs = [TrialCost(t.trial_id, None if rate is None else t.steps * rate,
                       _probes(config, t.steps, len(t.datasets)) if t.measures_affinity else 0.0, evaluation)
             for t in trials]
    pretraining = 0.0 if config.pretrain is None else None if rate is None else config.pretrain.steps * rate
    conversion = None
    if sizes is not None and scheduling.seconds_per_converted_sample is not None:
        conversion = sum(sum(splits.values()) for splits in sizes.values()) * scheduling.seconds_per_converted_sample
    elif sizes is None:
        missing.append("the data sets' sizes for the conversion (omgseg prepare first)")
    resources = config.train.resources
    return StudyCost(costs, pretraining, conversion, resources.workers if resources.use_gpu else 0, missing)
