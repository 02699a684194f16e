"""A study's plan, with no Ray and no MLflow: its combinations, each trial's mix, steps and
config, the targets it measures, and the dry run's cost estimate.

    plan_trials(config, sizes)  -> [Trial]: every (combination, seed)
    trial_config(config, trial, out, uri) -> the TrainConfig the trial runs
    targets(config)             -> [Target]: what the influence tables measure
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from omgseg.core.structures import Task
from omgseg.platform.config import StudyConfig, TrackingConfig, TrainConfig, metric_direction

# Validation losses are reported per query group: object queries serve the object tasks,
# prompt queries the prompted ones. Tasks of one group share one loss.
LOSS_GROUPS = {
    "object_queries": ({Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC, Task.VIDEO_PANOPTIC, Task.VIDEO_INSTANCE},
                       ("loss_ce", "loss_mask", "loss_dice")),
    "prompt_queries": ({Task.INTERACTIVE, Task.VOS}, ("loss_prompt_mask", "loss_prompt_dice")),
}
VAL_LOSS = "val_loss"


@dataclass(frozen=True)
class Trial:
    """One training run of a study: a combination of train data sets at one seed."""

    trial_id: str  # "<combination>-s<seed>"
    datasets: tuple[str, ...]
    ratios: tuple[float, ...]  # normalised, in the order of `datasets`
    seed: int
    steps: int
    measures_affinity: bool

    @property
    def combination(self) -> str:
        return "+".join(self.datasets)

    def to_json(self) -> dict:
        return {"trial_id": self.trial_id, "datasets": list(self.datasets), "ratios": list(self.ratios),
                "seed": self.seed, "steps": self.steps, "measures_affinity": self.measures_affinity}

    @classmethod
    def from_json(cls, data: dict) -> Trial:
        return cls(data["trial_id"], tuple(data["datasets"]), tuple(data["ratios"]), int(data["seed"]),
                   int(data["steps"]), bool(data["measures_affinity"]))


@dataclass(frozen=True)
class Target:
    """A number every trial reports and the influence tables compare: (data set, task, metric).
    Primary targets are validation losses (task = the query group, e.g. object_queries).

    Its scope is the trials whose training could move it: those that trained its query group
    (one of `supervisors` among their data sets) and, for a train data set's target, trained
    that data set (`requires`). Elsewhere its heads were never trained (a DAVIS-only trial's
    object queries), and their values say nothing about co-training."""

    dataset: str
    task: str
    metric: str
    direction: str  # "higher" or "lower" is better
    primary: bool
    requires: str | None = None  # the target's own data set when it is a train data set
    supervisors: frozenset[str] | None = None  # data sets whose training supervises its query group; None: any

    @property
    def family(self) -> str:
        return "primary" if self.primary else "secondary"

    def in_scope(self, datasets: tuple[str, ...]) -> bool:
        """Whether a trial on `datasets` trained what this target measures."""
        if self.requires is not None and self.requires not in datasets:
            return False
        return self.supervisors is None or not self.supervisors.isdisjoint(datasets)


def query_group(task: str) -> str:
    """The query group (LOSS_GROUPS) whose loss trains `task`."""
    parsed = Task.parse(task)
    return next(group for group, (served, _) in LOSS_GROUPS.items() if parsed in served)


def combination_name(datasets) -> str:
    return "+".join(datasets)


def with_control(dataset: str, control: str) -> tuple[str, str]:
    """The combination that trains `dataset` with the study's control: its controlled baseline."""
    return (dataset, control)


def combinations(config: StudyConfig) -> list[tuple[str, ...]]:
    """The study's combinations of train data sets, in config order, without repeats; then,
    with a `control`, each train data set with the control."""
    names = config.trained()
    out: list[tuple[str, ...]] = []
    for item in config.combinations:
        if item == "singletons":
            found = [(n,) for n in names]
        elif item == "pairs":
            found = list(itertools.combinations(names, 2))
        elif item == "leave_one_out":
            found = [tuple(n for n in names if n != left) for left in names] if len(names) > 1 else []
        elif item == "all":
            found = [tuple(names)]
        else:
            found = [tuple(n for n in names if n in item)]  # config order, so names match the planner's
        out += [c for c in found if c not in out]
    if config.control is not None:
        out += [with_control(n, config.control) for n in names]
    return out


def mixing_ratios(config: StudyConfig, combo: tuple[str, ...], sizes: dict[str, int] | None) -> tuple[float, ...]:
    """The normalised ratios of a combination: explicit ones if the config names it, else the policy's."""
    name = combination_name(combo)
    if name in config.mixing.explicit:
        raw = [config.mixing.explicit[name][n] for n in combo]
    elif config.mixing.policy == "proportional":
        if sizes is None:
            raise ValueError("proportional mixing needs the data sets' sizes (prepare the data first)")
        raw = [float(sizes[n]) for n in combo]
    else:
        raw = [1.0] * len(combo)
    total = sum(raw)
    return tuple(r / total for r in raw)


def trial_steps(config: StudyConfig, combo: tuple[str, ...]) -> int:
    """per_dataset: train.steps per data set of the combination (equal exposure); total: train.steps."""
    return config.train.steps * (len(combo) if config.budget == "per_dataset" else 1)


def plan_trials(config: StudyConfig, sizes: dict[str, int] | None = None) -> list[Trial]:
    """Every (combination, seed). The trials on all train data sets of `affinity_seeds` probe
    TAG affinity; when no combination trains on all of them, one such trial per seed is added."""
    combos = combinations(config)
    everything = tuple(config.trained())
    if not combos:
        raise ValueError("the study plans no trial: check combinations and train_datasets")
    unknown = sorted(set(config.mixing.explicit) - {combination_name(c) for c in combos})
    if unknown:
        raise ValueError(f"mixing.explicit names combinations {unknown} that the study does not train "
                         f"({[combination_name(c) for c in combos]})")
    measuring = config.train.affinity.enabled and len(everything) > 1
    if measuring and everything not in combos:
        combos.append(everything)
    probing_seeds = set(config.seeds[: config.affinity_seeds])
    return [
        Trial(trial_id=f"{combination_name(combo)}-s{seed}", datasets=combo, ratios=mixing_ratios(config, combo, sizes),
              seed=seed, steps=trial_steps(config, combo),
              measures_affinity=measuring and combo == everything and seed in probing_seeds)
        for combo in combos for seed in config.seeds
    ]


def targets(config: StudyConfig) -> list[Target]:
    """The primary targets (the validation loss of each query group of each evaluated data set)
    and the secondary ones (the configured metrics), in config order, each with its scope."""
    trainable = config.trained() + ([config.control] if config.control else [])
    supervisors = {group: frozenset(n for n in trainable
                                    if any(query_group(t) == group for t in config.data.datasets[n].supervised_tasks()))
                   for group in LOSS_GROUPS}

    def target(name: str, task: str, metric: str, direction: str, primary: bool, group: str) -> Target:
        return Target(name, task, metric, direction, primary, requires=name if name in config.trained() else None,
                      supervisors=supervisors[group])

    out = []
    for name, tasks in config.evaluated().items():
        wanted = {Task.parse(t) for t in tasks}
        out += [target(name, group, VAL_LOSS, "lower", True, group) for group, (served, _) in LOSS_GROUPS.items()
                if served & wanted]
    for name, tasks in config.evaluated().items():
        for task in tasks:
            for metric in config.metrics.get(f"{name}/{task}", config.metrics.get(task, [])):
                out.append(target(name, task, metric, metric_direction(metric), False, query_group(task)))
    return out


def pretrain_config(config: StudyConfig, out: Path, uri: str) -> TrainConfig:
    """The TrainConfig of the study's pretraining run (`pretrain:`), seed 0, not evaluated."""
    spec = config.train
    return TrainConfig(
        **spec.model_dump(exclude={"steps", "seed", "affinity", "output_dir"}),
        name="pretrain", data=config.data, mix=dict(config.pretrain.mix), steps=config.pretrain.steps, seed=0,
        evaluation={}, tracking=TrackingConfig(tracking_uri=uri, experiment=config.tracking.experiment),
        output_dir=out / "pretrain",
    )


def trial_config(config: StudyConfig, trial: Trial, out: Path, uri: str, init: Path | None = None) -> TrainConfig:
    """The TrainConfig of one trial: the study's `train:` spec with the trial's mix, seed and
    steps (and the pretrained `init` weights), evaluated on the study's evaluation sets,
    tracked at the study's URI `uri`."""
    spec = config.train
    affinity = spec.affinity.model_copy(update={"enabled": trial.measures_affinity})
    model = spec.model if init is None else spec.model.model_copy(update={"init_checkpoint": init})
    return TrainConfig(
        **spec.model_dump(exclude={"steps", "seed", "affinity", "output_dir", "model"}), model=model,
        name=trial.trial_id, data=config.data, mix=dict(zip(trial.datasets, trial.ratios)), steps=trial.steps,
        seed=trial.seed, affinity=affinity, evaluation=config.evaluated(),
        tracking=TrackingConfig(tracking_uri=uri, experiment=config.tracking.experiment),
        output_dir=out / "trials",  # the run's files: trials/<trial id>/<MLflow run id>/
    )


def dry_run(config: StudyConfig) -> dict:
    """The plan without starting anything: trials, resources, estimated hours."""
    plan = plan_trials(config)
    res = config.train.resources
    seconds_per_step = config.scheduling.seconds_per_step
    trial_hours = gpu_hours = None
    steps = sum(t.steps for t in plan) + (config.pretrain.steps if config.pretrain else 0)
    if seconds_per_step:
        trial_hours = steps * seconds_per_step / 3600
        gpu_hours = trial_hours * res.workers if res.use_gpu else 0.0
    return {
        "study": config.name,
        "budget": config.budget,
        "trials": [{"trial_id": t.trial_id, "mix": dict(zip(t.datasets, [round(r, 4) for r in t.ratios])),
                    "seed": t.seed, "steps": t.steps, "measures_affinity": t.measures_affinity} for t in plan],
        "n_trials": len(plan),
        "n_seeds": len(config.seeds),
        "total_steps": steps,
        "per_trial": {"workers": res.workers, "cpus_per_worker": res.cpus_per_worker,
                      "gpus_per_worker": 1 if res.use_gpu else 0},
        "max_concurrent_trials": config.scheduling.max_concurrent_trials,
        "estimated_trial_hours": trial_hours,
        "estimated_gpu_hours": gpu_hours,
        "evaluation": config.evaluated(),
        "targets": [f"{t.dataset}/{t.task}/{t.metric}" for t in targets(config)],
    }
