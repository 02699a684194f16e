"""The typed records that cross process edges, each with `to_json` / `from_json`:

- Evaluation: a run's evaluation, per data set its tasks' metrics and its query groups'
  validation losses (eval.json; inside RunReport and TrialRecord).
- RunReport: what a finished training run reports (rank 0 writes it beside the final
  checkpoint; the driver reads it back).
- TrainResult: a RunReport with where the run went (MLflow run, folder, model file).
- TrialRecord: what a study trial leaves behind (trial.json, the MLflow ledger's entry).
- StudyState: study.json, what --resume, the report and the UI read.
- StudySummary: summary.json, what a study concluded (with its parts: RowCounts, NullCheck,
  Estimates, PlantedCheck, ...), what the report and the docs' tables read.

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
SUMMARY_FILE = "summary.json"


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
    combination: str  # "coco+vipseg", for people (the datasets are the combination)
    datasets: list[str]
    ratios: list[float]  # normalised, in the order of `datasets`
    seed: int
    steps: int
    status: str  # "finished" or "failed"
    mixture: str | None = None  # a ratio sweep's mixture or a verification arm (plan.Trial.mixture)
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


# ---------------------------------------------------------------------------------------------
# summary.json: what a study concluded, written by omgseg.platform.study.summary, read by the
# report, the docs' tables and scripts. Its JSON keys are the fields' names.


@dataclass
class FailedTrial(JsonRecord):
    trial_id: str
    error: str | None
    log: str | None

    WHAT = "summary.json failed trial"


@dataclass
class RowCounts(JsonRecord):
    """One family and kind of influence rows (e.g. primary/pair)."""

    rows: int
    tested: int  # rows with a p-value
    significant_after_correction: int
    median_mde: float | None  # 80 % power at 5 %, before correction
    median_mde_adjusted: float | None  # the same at the level BH used

    WHAT = "summary.json significance counts"


@dataclass
class NullCheck(JsonRecord):
    """The A/A check of one family (omgseg.platform.study.stats.aa_check)."""

    tests: int
    significant_uncorrected: int
    significant_after_correction: int
    smallest_q: float | None
    passed: bool | None  # None: nothing to test (fewer than 4 seeds)

    WHAT = "summary.json null check"


@dataclass
class PairAgreement(JsonRecord):
    source_dataset: str
    target_dataset: str
    affinity: float
    influence: float

    WHAT = "summary.json pair"


@dataclass
class Agreement(JsonRecord):
    """The cheap estimate against the exhaustive one over the ordered pairs they share."""

    n_pairs: int
    spearman: float | None
    permutation_p: float | None
    bootstrap_95: list[float] | None
    pairs: list[PairAgreement]

    WHAT = "summary.json agreement"

    @classmethod
    def from_json(cls, data: dict):
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "pairs": [PairAgreement.from_json(p) for p in known["pairs"]]})


@dataclass
class SplitHalf(JsonRecord):
    """One side measured twice on disjoint halves: the halves' Spearman, Spearman-Brown corrected."""

    halves_spearman: float | None
    spearman_brown: float | None
    split: str = "seeds"  # or "probes (even, odd)"

    WHAT = "summary.json reliability"


@dataclass
class Grouping(JsonRecord):
    """The partition the cheap estimate picks, scored by the exhaustive one."""

    partitions: int
    best: list[str]
    best_score: float
    chosen_by_affinity: list[str]
    chosen_score: float
    regret: float

    WHAT = "summary.json grouping"


@dataclass
class Estimates(Agreement):
    """The cheap estimate against the exhaustive one (omgseg.platform.study.estimates)."""

    reliability: dict[str, SplitHalf] = field(default_factory=dict)  # "exhaustive", "cheap"
    grouping: Grouping | None = None
    exhaustive_trial_hours: float = 0.0
    affinity_trial_hours: float = 0.0
    all_trial_hours: float = 0.0
    cost_ratio: float | None = None
    against_controlled: Agreement | None = None  # a study with a control

    WHAT = "summary.json estimates"

    @classmethod
    def from_json(cls, data: dict):
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "pairs": [PairAgreement.from_json(p) for p in known["pairs"]],
                      "reliability": {k: SplitHalf.from_json(v) for k, v in known.get("reliability", {}).items()},
                      "grouping": Grouping.from_json(known["grouping"]) if known.get("grouping") else None,
                      "against_controlled": Agreement.from_json(known["against_controlled"])
                      if known.get("against_controlled") else None})


@dataclass
class PlantedPair(JsonRecord):
    """One planted (source, target, effect) against the influence row that measured it."""

    source: str
    target: str
    task: str
    truth: str  # helps, hurts, none
    delta: float
    ci_low: float | None
    ci_high: float | None
    ci_low_adjusted: float | None
    ci_high_adjusted: float | None
    q_value: float | None
    mde: float | None
    agrees: bool

    WHAT = "summary.json planted pair"


@dataclass
class PlantedCheck(JsonRecord):
    """A planted study's truth against its influence rows of `kind`."""

    kind: str
    pairs: list[PlantedPair]
    agree: int
    total: int
    recovered: dict[str, str]  # effect -> "agreeing/planted"
    false_positives_on_none: int

    WHAT = "summary.json planted check"

    @classmethod
    def from_json(cls, data: dict):
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "pairs": [PlantedPair.from_json(p) for p in known["pairs"]]})


@dataclass
class SurrogateFit(JsonRecord):
    """A sampled design's surrogate of one primary target predicting held-out subsets
    (omgseg.platform.study.surrogate.predictive_fit)."""

    dataset: str
    task: str
    metric: str
    subsets: int
    parameters: int
    rmse: float | None
    r2: float | None

    WHAT = "summary.json surrogate fit"


@dataclass
class ObjectiveTerm(JsonRecord):
    """One target of an objective (omgseg.platform.study.recommend): its weight and the scale it
    is divided by (its mean over the fitted trials, 1 for a single target)."""

    dataset: str
    task: str
    metric: str
    direction: str
    weight: float
    scale: float

    WHAT = "summary.json objective term"


@dataclass
class BaselineComparison(JsonRecord):
    """The recommended mixture against one baseline, seed by seed, on the objective (lower is
    better): delta = baseline - recommended, positive when the recommendation does better."""

    baseline: str
    shares: dict[str, float]
    delta: float
    n_seeds: int
    ci_low: float | None
    ci_high: float | None
    ci_low_adjusted: float | None  # at the level BH used over the baselines
    ci_high_adjusted: float | None
    p_value: float | None
    q_value: float | None
    mde: float | None
    mde_adjusted: float | None
    beaten: bool  # the adjusted interval is above zero

    WHAT = "summary.json baseline comparison"


@dataclass
class Verification(JsonRecord):
    """A recommendation trained against its baselines (omgseg.platform.study.verify)."""

    objective: str
    folder: str  # the verification study's folder
    recommended: dict[str, float]
    comparisons: list[BaselineComparison]
    confirmed: bool  # beats every baseline with an adjusted interval above zero
    not_beaten: list[str]

    WHAT = "summary.json verification"

    @classmethod
    def from_json(cls, data: dict):
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "comparisons": [BaselineComparison.from_json(c) for c in known["comparisons"]]})


@dataclass
class Recommendation(JsonRecord):
    """The data sets and mixing ratios predicted best for an objective, with the prediction's
    uncertainty (omgseg.platform.study.recommend)."""

    objective: str
    terms: list[ObjectiveTerm]
    source: str  # which model predicted it
    shares: dict[str, float]  # per train data set, 0 for those left out
    subset: list[str]
    predicted: float  # the objective predicted at `shares`
    predicted_ci: list[float]  # its 95 % interval
    share_intervals: dict[str, list[float]]  # 2.5 and 97.5 percentiles of each share over bootstrap refits
    in_subset: dict[str, float]  # how often each data set is in the recommended subset over those refits
    bootstraps: int
    verification: Verification | None = None

    WHAT = "summary.json recommendation"

    @classmethod
    def from_json(cls, data: dict):
        known = _known(cls, data, cls.WHAT)
        return cls(**{**known, "terms": [ObjectiveTerm.from_json(t) for t in known["terms"]],
                      "verification": Verification.from_json(known["verification"]) if known.get("verification") else None})


@dataclass
class StudySummary(JsonRecord):
    """summary.json: the study's counts, checks and comparisons, written whole at its end."""

    study: str
    commit: str | None  # the git commit of the code that ran it (omgseg.platform.study.summary.code_commit)
    trials: int
    finished: int
    failed: list[FailedTrial]
    seeds: int
    budget: str
    significant: dict[str, RowCounts]  # "<family>/<kind>" -> counts
    null_check: dict[str, NullCheck]  # family -> A/A check
    pairing_ratio_median: float | None
    estimates: Estimates
    tables: dict[str, str]  # table name -> Parquet file
    tracking_uri: str
    parent_run_id: str
    driver_seconds: dict[str, float]  # this driver run (a resumed study: the last run only)
    concurrent_trials: int
    planted: PlantedCheck | None = None
    surrogate: list[SurrogateFit] = field(default_factory=list)  # a sampled design's targets
    recommendations: list[Recommendation] = field(default_factory=list)  # omgseg recommend, or the config's recommend
    verification: Verification | None = None  # a verification study's result

    WHAT = SUMMARY_FILE

    @classmethod
    def from_json(cls, data: dict):
        known = _known(cls, data, cls.WHAT)
        return cls(**{
            **known, "failed": [FailedTrial.from_json(f) for f in known["failed"]],
            "significant": {k: RowCounts.from_json(v) for k, v in known["significant"].items()},
            "null_check": {k: NullCheck.from_json(v) for k, v in known["null_check"].items()},
            "estimates": Estimates.from_json(known["estimates"]),
            "planted": PlantedCheck.from_json(known["planted"]) if known.get("planted") else None,
            "surrogate": [SurrogateFit.from_json(f) for f in known.get("surrogate", [])],
            "recommendations": [Recommendation.from_json(r) for r in known.get("recommendations", [])],
            "verification": Verification.from_json(known["verification"]) if known.get("verification") else None,
        })

    def write(self, folder: Path) -> Path:
        """<folder>/summary.json, written to a temporary name and renamed: never half-written."""
        import json

        path = Path(folder) / SUMMARY_FILE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_json(), indent=1))
        partial.replace(path)
        return path

    @classmethod
    def read(cls, folder: Path) -> StudySummary:
        import json

        path = Path(folder) / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the study has not finished its tables yet")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}: not a study summary ({err})") from None
