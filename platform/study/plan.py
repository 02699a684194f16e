"""A study's plan, with no Ray and no MLflow: its combinations, each trial's mix, steps and
config, the targets it measures, and the dry run's cost estimate.

    plan_trials(config, sizes)  -> [Trial]: every (combination, seed) of its design (study.design)
    trial_config(config, trial, out, uri) -> the TrainConfig the trial runs
    targets(config)             -> [Target]: what the influence tables measure
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omgseg.platform.config import StudyConfig, TrackingConfig, TrainConfig, metric_direction
from omgseg.platform.study.design import Combination, StudyDesign
from omgseg.platform.study.mixtures import dirichlet_mixtures

VAL_LOSS = "val_loss"  # the metric name of a query group's validation loss


@dataclass(frozen=True)
class Trial:
    """One training run of a study: a combination of train data sets at one seed."""

    trial_id: str  # "<combination>-s<seed>"
    datasets: tuple[str, ...]
    ratios: tuple[float, ...]  # normalised, in the order of `datasets`
    seed: int
    steps: int
    measures_affinity: bool
    mixture: str | None = None  # a ratio sweep's mixture ("m3"), or a verification arm's label; None: the design's mix

    @property
    def combination(self) -> str:
        """The combination as people read it ("coco+vipseg"): for ids and tables, never parsed."""
        return StudyDesign.name(self.datasets)

    def to_json(self) -> dict:
        return {"trial_id": self.trial_id, "datasets": list(self.datasets), "ratios": list(self.ratios),
                "seed": self.seed, "steps": self.steps, "measures_affinity": self.measures_affinity,
                "mixture": self.mixture}

    @classmethod
    def from_json(cls, data: dict) -> Trial:
        return cls(data["trial_id"], tuple(data["datasets"]), tuple(data["ratios"]), int(data["seed"]),
                   int(data["steps"]), bool(data["measures_affinity"]), data.get("mixture"))


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


def mixing_ratios(config: StudyConfig, combo: Combination, sizes: dict[str, int] | None) -> tuple[float, ...]:
    """The normalised ratios of a combination: explicit ones if the config gives ratios for
    exactly its data sets, else the policy's."""
    explicit = next((r for r in config.mixing.explicit.values() if set(r) == set(combo)), None)
    if explicit is not None:
        raw = [explicit[n] for n in combo]
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
    """Every (combination, seed) of the study's design (a sampled subset at the seeds it was
    drawn at, anything else at every seed). The trials on all train data sets of
    `affinity_seeds` probe TAG affinity; when no combination trains on all of them, one such
    trial per seed is added."""
    design = StudyDesign.from_config(config)
    if config.arms is not None:
        return arm_trials(config, design)
    combos = list(design.combinations)
    if not combos and config.mixing.sampled is None:
        raise ValueError("the study plans no trial: check combinations and train_datasets")
    everything = design.everything
    measuring = config.train.affinity.enabled and len(everything) > 1
    if measuring and everything not in combos:
        combos.append(everything)
    unknown = sorted(label for label, ratios in config.mixing.explicit.items() if design.order(ratios) not in combos)
    if unknown:
        raise ValueError(f"mixing.explicit gives ratios for combinations {unknown} that the study does not train "
                         f"({[design.name(c) for c in combos]})")
    probing_seeds = set(config.seeds[: config.affinity_seeds])
    trials = [
        Trial(trial_id=f"{design.name(combo)}-s{seed}", datasets=combo, ratios=mixing_ratios(config, combo, sizes),
              seed=seed, steps=trial_steps(config, combo),
              measures_affinity=measuring and combo == everything and seed in probing_seeds)
        for combo in combos for seed in design.seeds_of(combo, config.seeds)
    ]
    sweep = config.mixing.sampled
    if sweep is not None:
        mixtures = dirichlet_mixtures(everything, sweep.mixtures, sweep.concentration, sweep.seed)
        trials += [Trial(trial_id=f"{design.name(everything)}-m{k}-s{seed}", datasets=everything, ratios=ratios,
                         seed=seed, steps=trial_steps(config, everything), measures_affinity=False, mixture=f"m{k}")
                   for k, ratios in enumerate(mixtures) for seed in config.seeds]
    return trials


def arm_trials(config: StudyConfig, design: StudyDesign) -> list[Trial]:
    """A verification study's trials: each arm of `config.arms` (a label and its ratios) at every
    seed, on the data sets it gives a ratio above 0, for the budget's steps."""
    trials = []
    for label, ratios in (config.arms or {}).items():
        combo = design.order(n for n, r in ratios.items() if r > 0)
        total = sum(ratios[n] for n in combo)
        trials += [Trial(trial_id=f"{label}-s{seed}", datasets=combo, ratios=tuple(ratios[n] / total for n in combo),
                         seed=seed, steps=trial_steps(config, combo), measures_affinity=False, mixture=label)
                   for seed in config.seeds]
    return trials


def targets(config: StudyConfig) -> list[Target]:
    """The primary targets (the validation loss of each query group that serves an evaluated
    data set's tasks: platform/tasks.py) and the secondary ones (the configured metrics), in
    config order, each with its scope: the data sets whose training supervises its query group."""
    from omgseg.platform.tasks import QueryGroup, loss_groups  # the task table imports torch: only when asked

    trainable = config.trained() + ([config.control] if config.control else [])
    supervisors = {group: frozenset(n for n in trainable
                                    if group in loss_groups(config.data.datasets[n].supervised_tasks()))
                   for group in QueryGroup}

    def target(name: str, task: str, metric: str, direction: str, primary: bool, group: QueryGroup) -> Target:
        return Target(name, task, metric, direction, primary, requires=name if name in config.trained() else None,
                      supervisors=supervisors[group])

    out = []
    for name, tasks in config.evaluated().items():
        out += [target(name, group.value, VAL_LOSS, "lower", True, group) for group in loss_groups(tasks)]
    for name, tasks in config.evaluated().items():
        for task in tasks:
            for metric in config.metrics.get(f"{name}/{task}", config.metrics.get(task, [])):
                out.append(target(name, task, metric, metric_direction(task, metric), False, loss_groups([task])[0]))
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


def dry_run(config: StudyConfig, sizes: dict[str, dict[str, int]] | None = None) -> dict:
    """The plan without starting anything: trials, resources, and the cost of training, probes,
    evaluation and conversion (omgseg.platform.study.cost), per trial and in total; for a
    sampled design, also the exhaustive pair design's cost. `sizes`: {data set: {split:
    samples}} when the data are prepared."""
    from omgseg.platform.study.cost import study_cost

    plan = plan_trials(config)
    res = config.train.resources
    cost = study_cost(config, plan, sizes).to_json()
    steps = sum(t.steps for t in plan) + (config.pretrain.steps if config.pretrain else 0)
    out = {
        "study": config.name,
        "budget": config.budget,
        "trials": [{"trial_id": t.trial_id, "mix": dict(zip(t.datasets, [round(r, 4) for r in t.ratios])),
                    "seed": t.seed, "steps": t.steps, "measures_affinity": t.measures_affinity, **{
                        k: v for k, v in part.items() if k != "trial_id"}}
                   for t, part in zip(plan, cost.pop("per_trial"))],
        "n_trials": len(plan),
        "n_seeds": len(config.seeds),
        "total_steps": steps,
        "per_trial": {"workers": res.workers, "cpus_per_worker": res.cpus_per_worker,
                      "gpus_per_worker": 1 if res.use_gpu else 0},
        "max_concurrent_trials": config.scheduling.max_concurrent_trials,
        "estimated_trial_hours": cost["trial_hours"],
        "estimated_gpu_hours": cost["gpu_hours"],
        "cost": cost,
        "evaluation": config.evaluated(),
        "targets": [f"{t.dataset}/{t.task}/{t.metric}" for t in targets(config)],
    }
    design = StudyDesign.from_config(config)
    if design.sampled:
        exhaustive = config.model_copy(update={"combinations": ["singletons", "pairs"]})
        reference = study_cost(exhaustive, plan_trials(exhaustive), sizes).to_json()
        reference.pop("per_trial")
        out["exhaustive_design"] = {"combinations": [design.name(c) for c in design.exhaustive().combinations],
                                    "n_trials": len(plan_trials(exhaustive)), **reference}
        if cost["trial_hours"] and reference["trial_hours"]:
            out["cost_against_exhaustive"] = cost["trial_hours"] / reference["trial_hours"]
    return out
