"""The typed records that cross process edges, each with `to_json` / `from_json`:

- Evaluation: a run's evaluation, per data set its tasks' metrics and its query groups'
  validation losses (eval.json; inside RunReport and TrialRecord).
- RunReport: what a finished training run reports (rank 0 writes it beside the final
  checkpoint; the driver reads it back).
- TrainResult: a RunReport with where the run went (MLflow run, folder, model file).
- TrialRecord: what a study trial leaves behind (trial.json, the MLflow ledger's entry).
- StudyState: study.json, what --resume, the report and the UI read.

- TrialSpec: what the study driver sends to a trial.

No Ray and no MLflow here: dashboards import these without either.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from omgseg.platform.study.plan import VAL_LOSS, Trial

REPORT_FILE = "report.json"
TRIAL_FILE = "trial.json"
STUDY_FILE = "study.json"


def _known(cls, data: dict, where: str) -> dict:
    """`data` restricted to the fields of `cls`, with a clear error for missing required ones."""
    names = {f.name for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}")
    return {k: v for k, v in data.items() if k in names}


class JsonRecord:
    """to_json / from_json for a dataclass of JSON values; `WHAT` names it in errors."""

    WHAT = "record"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        return cls(**_known(cls, data, cls.WHAT))


@dataclass(frozen=True)
class Score:
    """One number of an evaluation: a task's metric, or a query group's validation loss
    (task = the group, metric = "val_loss")."""

    dataset: str
    task: str
    metric: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.task}/{self.metric}"


@dataclass
class DatasetEvaluation:
    """One data set's evaluation on its val split."""

    tasks: dict[str, dict] = field(default_factory=dict)  # {task: {metric: value}}, nested tables such as per_class too
    losses: dict[str, float] = field(default_factory=dict)  # {query group: mean validation loss}


@dataclass
class Evaluation:
    """A run's evaluation, {data set: DatasetEvaluation}; in JSON (eval.json, report.json,
    trial.json) {data set: {"tasks": {task: metrics}, "losses": {query group: loss}}}."""

    datasets: dict[str, DatasetEvaluation] = field(default_factory=dict)

    def scores(self) -> list[Score]:
        """Every scalar: the tasks' metrics (nested tables left out), then the validation losses."""
        out = []
        for name, evaluation in self.datasets.items():
            out += [Score(name, task, metric, float(value)) for task, values in evaluation.tasks.items()
                    for metric, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
            out += [Score(name, group, VAL_LOSS, float(loss)) for group, loss in evaluation.losses.items()]
        return out

    def to_json(self) -> dict:
        return {name: {"tasks": e.tasks, "losses": e.losses} for name, e in self.datasets.items()}

    @classmethod
    def from_json(cls, data: object, where: str = "evaluation") -> Evaluation:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: an evaluation is an object of data sets, got {type(data).__name__}")
        datasets = {}
        for name, entry in data.items():
            if not isinstance(entry, dict) or sorted(entry) != ["losses", "tasks"]:
                raise ValueError(f"{where}: data set {name!r} needs exactly 'tasks' and 'losses', got "
                                 f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
            bad = {g: v for g, v in entry["losses"].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
            if bad or not all(isinstance(v, dict) for v in entry["tasks"].values()):
                raise ValueError(f"{where}: data set {name!r}: losses are numbers and tasks objects of metrics")
            datasets[name] = DatasetEvaluation(dict(entry["tasks"]), {g: float(v) for g, v in entry["losses"].items()})
        return cls(datasets)


@dataclass
class RunReport(JsonRecord):
    """What one training run measured, summed over its ranks."""

    steps: int
    samples: dict[str, int]  # samples drawn per data set, all ranks
    seconds: dict[str, float]  # rank 0's time: "train" (inside steps), "affinity", "eval"; the driver adds "fit"
    evaluation: Evaluation = field(default_factory=Evaluation)
    affinity: dict[str, dict[str, float]] = field(default_factory=dict)  # {source: {target: mean Z}}
    affinity_se: dict[str, dict[str, float]] = field(default_factory=dict)  # standard error over probes
    affinity_probes: int = 0
    affinity_halves: list[dict] = field(default_factory=list)  # mean Z of the even and of the odd probes
    reads: list[dict] = field(default_factory=list)  # per rank: {"rank", "counts", "reads"}: which node read which shards

    @property
    def realised_mix(self) -> dict[str, float]:
        total = sum(self.samples.values())
        return {k: v / total for k, v in self.samples.items()} if total else {}

    WHAT = "run report"

    def to_json(self) -> dict:
        return {**asdict(self), "evaluation": self.evaluation.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> RunReport:
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "evaluation": Evaluation.from_json(known.get("evaluation", {}), cls.WHAT)})


@dataclass
class TrainResult:
    """A finished training run: its report, its MLflow run and its files."""

    run_id: str
    run_dir: Path
    checkpoint: Path  # the final model (load with omgseg.model.checkpoint.load_checkpoint)
    report: RunReport
    tracking_uri: str  # the MLflow store the run is in


@dataclass
class TrialRecord(JsonRecord):
    """What a finished (or failed) trial leaves behind; stored as trial.json with its MLflow run."""

    trial_id: str
    combination: str  # "coco+vipseg"
    datasets: list[str]
    ratios: list[float]  # normalised, in the order of `datasets`
    seed: int
    steps: int
    status: str  # "finished" or "failed"
    mlflow_run_id: str | None = None
    error: str | None = None
    log: str | None = None  # the trial's log file
    measures_affinity: bool = False
    wall_seconds: float = 0.0  # the trial function, start to end
    seconds: dict[str, float] = field(default_factory=dict)  # "train" (inside steps), "affinity", "eval", "setup"
    samples: dict[str, int] = field(default_factory=dict)  # realised samples per data set
    metrics: Evaluation = field(default_factory=Evaluation)  # the run's evaluation (empty for a failed trial)
    affinity: dict[str, dict[str, float]] = field(default_factory=dict)  # {source: {target: mean Z}}
    affinity_se: dict[str, dict[str, float]] = field(default_factory=dict)
    affinity_halves: list[dict] = field(default_factory=list)  # mean Z of the even and of the odd probes
    reads: list[dict] = field(default_factory=list)

    WHAT = "trial record"

    def to_json(self) -> dict:
        return {**asdict(self), "metrics": self.metrics.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> TrialRecord:
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "metrics": Evaluation.from_json(known.get("metrics", {}), cls.WHAT)})


@dataclass
class StudyState(JsonRecord):
    """study.json: the study's MLflow parent run and its resolved config."""

    name: str
    parent_run_id: str
    tracking_uri: str
    config: dict  # StudyConfig.model_dump(mode="json")
    source: str = "config"  # the config file it was read from

    WHAT = STUDY_FILE

    @classmethod
    def read(cls, folder: Path) -> StudyState:
        import json

        path = Path(folder) / STUDY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a study folder: {path} does not exist")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a study state ({err})") from None


@dataclass
class TrialSpec:
    """What the study driver sends to a trial: the trial, the config it trains (its `tracking`
    names the study's MLflow store), and where it records (the parent run, its own log file)."""

    trial: Trial
    config: dict  # TrainConfig.model_dump(mode="json")
    parent_run_id: str
    study: str
    log: str  # the trial's log file: everything it prints
    in_process: bool  # one worker: the loop runs in the trial's own process

    def to_json(self) -> dict:
        return {**asdict(self), "trial": self.trial.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> TrialSpec:
        fields_ = _known(cls, data, "trial spec")
        return cls(**{**fields_, "trial": Trial.from_json(fields_["trial"])})
