"""The co-training study on Ray Tune: one trial per (data set combination, seed), each a
training run (omgseg.platform.training.train) tracked as a child of one MLflow parent run; then the
result tables, their statistics and the comparison of the cheap estimate.

    run_study(config, out)   -> trains what is not finished yet, writes the tables, returns them

The plan (combinations, mixes, steps, targets) is omgseg.platform.study.plan; the records that cross
process edges are omgseg.platform.records; what a trial holds on Ray is omgseg.platform.cluster;
the tables and summary.json are omgseg.platform.study.summary; MLflow is the ledger
(omgseg.platform.tracking): a
trial is done when its child run is FINISHED and holds trial.json, so `--resume` skips it
without re-running or duplicating it, and continues an interrupted one in its own MLflow run
from its last checkpoint.

A trial of one worker runs the training loop in its own Tune actor, and actors are reused
from trial to trial: a fresh Train controller and worker process per trial (about 29 s of
start-up measured here) is paid only by multi-worker trials, which keep Ray Train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from ray.tune import Callback

from omgseg.platform.cluster import start_for_study, trial_resources
from omgseg.platform.config import ConfigError, StudyConfig, flatten, load_config
from omgseg.platform.console import elapsed, error_line, redirect_output, say
from omgseg.platform.records import STUDY_FILE, Evaluation, StudyState, TrialRecord, TrialSpec
from omgseg.platform.study.cost import prepared_sizes
from omgseg.platform.study.plan import Trial, dry_run, plan_trials, trial_config
from omgseg.platform.study.summary import StudyResult, finish_study, print_summary

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "studies" / "configs" / "default.yaml"


def _say(text: str) -> None:
    say(text, prefix="[study]")


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Ray Tune actor)


def run_trial(param: dict) -> None:
    """Ray Tune's function trainable: one training run, its record logged as trial.json.
    Everything the trial prints goes to its log file."""
    from ray import tune

    spec = TrialSpec.from_json(param["spec"])
    with redirect_output(Path(spec.log)):
        try:
            record = _train_trial(spec)
        except BaseException:
            traceback.print_exc()  # into the trial's log: the console gets one line naming it
            raise
    tune.report({"record": json.dumps(record.to_json())})


def _train_trial(spec: TrialSpec) -> TrialRecord:
    import torch

    from omgseg.platform.config import TrainConfig
    from omgseg.platform.tracking import child_runs, log_record
    from omgseg.platform.training.train import run_training

    started = time.perf_counter()
    config = TrainConfig.model_validate(spec.config)
    trial = spec.trial
    if spec.in_process:
        torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))
    # A retried or resumed trial continues its own MLflow run instead of opening a second one.
    uri = config.tracking.tracking_uri  # the study resolved it and put it in every trial's config
    run_id = child_runs(uri, spec.parent_run_id).get(trial.trial_id, (None, None))[0]
    tags = {"omgseg.trial_id": trial.trial_id, "omgseg.study": spec.study}
    print(f"[trial] {trial.trial_id}: {trial.steps} steps on {trial.combination}, seed {trial.seed}", flush=True)
    result = run_training(config, parent_run_id=spec.parent_run_id, tags=tags, run_id=run_id, prepare=False,
                          in_process=spec.in_process, quiet=True)
    report = result.report
    record = TrialRecord(
        trial_id=trial.trial_id, combination=trial.combination, datasets=list(trial.datasets), ratios=list(trial.ratios),
        seed=trial.seed, steps=report.steps, status="finished", mixture=trial.mixture, mlflow_run_id=result.run_id,
        log=spec.log,
        measures_affinity=trial.measures_affinity, wall_seconds=time.perf_counter() - started, seconds=report.seconds,
        samples=report.samples, metrics=report.evaluation, affinity=report.affinity, affinity_se=report.affinity_se,
        affinity_halves=report.affinity_halves, reads=report.reads,
    )
    log_record(uri, record, config.output_dir / trial.trial_id)
    return record


# ---------------------------------------------------------------------------------------------
# The driver


def study_dir(config: StudyConfig, out: Path | None) -> Path:
    return (Path(out) if out is not None else Path("outputs/studies") / config.name).absolute()


def _check_resume(out: Path, config: StudyConfig, resume: bool) -> StudyState | None:
    """The saved study state when resuming; raises when the folder and the flag disagree."""
    if not (out / STUDY_FILE).is_file():
        if resume:
            _say(f"--resume: no study at {out} yet, starting it")
        return None
    if not resume:
        raise ValueError(f"a study already exists at {out}: pass --resume to continue it, or --out for a new folder")
    state = StudyState.read(out)
    saved, now = flatten(state.config), flatten(json.loads(config.model_dump_json()))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"--resume: the config differs from the study's at {out} in {changed}")
    return state


def _open_study(config: StudyConfig, out: Path, uri: str, state: StudyState | None, source: str) -> StudyState:
    """The study's MLflow parent run (created with the config, or set RUNNING again) and study.json,
    which carries the tracking URI every later step reads."""
    from omgseg.platform.tracking import open_study_run

    if state is not None:
        open_study_run(config, uri, state.parent_run_id)
        if state.tracking_uri == uri:
            return state
        state = dataclasses.replace(state, tracking_uri=uri)  # a moved study folder: its SQLite file moved too
    else:
        state = StudyState(name=config.name, parent_run_id=open_study_run(config, uri), tracking_uri=uri,
                           config=json.loads(config.model_dump_json()), source=source)
        (out / "config.json").write_text(config.model_dump_json(indent=2))
    partial = out / (STUDY_FILE + ".partial")
    partial.write_text(json.dumps(state.to_json(), indent=1))
    partial.replace(out / STUDY_FILE)
    return state


def _quiet_libraries(log: Path) -> None:
    """Ray's, Tune's and MLflow's Python loggers into the driver's log file, not the console,
    and Tune's legacy reporter (silent at verbose=0) instead of its experiment box."""
    import mlflow  # noqa: F401 - MLflow configures its loggers when imported: import first, then redirect

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "mlflow", "alembic", "open_clip", "urllib3"):
        library = logging.getLogger(name)
        library.handlers = [handler]
        library.propagate = False


def run_study(config: StudyConfig, out: Path | None = None, *, resume: bool = False, source: str = "config",
              verbose: bool = False) -> StudyResult:
    """Plan, prepare data, train every unfinished trial on Ray Tune, write the tables."""
    from omgseg.platform.tracking import check_cluster_store, finished_records, resolve_tracking_uri

    out = study_dir(config, out)
    seconds = DriverSeconds()
    started = time.perf_counter()
    plan_trials(config)  # a config that plans nothing fails before any data is made
    saved = _check_resume(out, config, resume)
    _check_sources(config)
    logs = _log_folder(out, verbose)
    plan = plan_trials(config, _prepare(config, verbose))
    seconds.prepare = time.perf_counter() - started
    uri = resolve_tracking_uri(config.tracking, out)  # resolved once: trials get it in their config
    check_cluster_store(uri, "tracking.tracking_uri")
    run = StudyRun(config, out, _open_study(config, out, uri, saved, source), logs, verbose, seconds)
    done = finished_records(uri, run.state.parent_run_id)
    pending = [t for t in plan if t.trial_id not in done]
    _announce(run, plan, len(done), len(pending))
    slots, failed = _run_trials(run, pending, done, len(plan)) if pending else (0, {})
    records = _records(run, plan, done, failed)
    return finish_study(config, out, uri, run.state.parent_run_id, records, asdict(seconds), slots)


@dataclass
class DriverSeconds:
    """Where this driver run's time went (a resumed study: the last run only); summary.json's driver_seconds."""

    prepare: float = 0.0
    ray_init: float = 0.0
    pretrain: float = 0.0
    trials: float = 0.0


@dataclass
class StudyRun:
    """What the steps of one driver run share: the study, its folder, its state (MLflow parent
    run and tracking URI, as in study.json), its log folder and its clock."""

    config: StudyConfig
    out: Path
    state: StudyState
    logs: Path
    verbose: bool
    seconds: DriverSeconds

    def log(self, trial: Trial) -> str:
        return str(self.logs / f"{trial.trial_id}.log")


def _log_folder(out: Path, verbose: bool) -> Path:
    """<out>/logs, with Ray's, Tune's and MLflow's loggers writing to its driver.log unless `verbose`."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not verbose:
        _quiet_libraries(logs / "driver.log")
    return logs


def _check_sources(config: StudyConfig) -> None:
    """A data set that cannot be read fails before anything is written or started."""
    for name, spec in config.data.datasets.items():
        if spec.src is not None and not Path(spec.src).exists():
            raise FileNotFoundError(f"data set {name!r}: source folder {spec.src} does not exist")


def _prepare(config: StudyConfig, verbose: bool) -> dict[str, int]:
    """The study's data made ready (cached); returns each train split's size, which proportional
    mixing needs."""
    from omgseg.datasets.manifest import read_manifest
    from omgseg.platform.data import prepare_data

    dirs = prepare_data(config.data, config.splits_read(), progress=verbose)
    return {name: read_manifest(splits["train"]).total_samples for name, splits in dirs.items() if "train" in splits}


def _announce(run: StudyRun, plan: list[Trial], done: int, pending: int) -> None:
    config = run.config
    res = config.train.resources
    combos = len({(t.datasets, t.mixture) for t in plan})
    shape = (f"{combos} combinations x {len(config.seeds)} seeds" if combos * len(config.seeds) == len(plan)
             else f"{combos} combinations over {len(config.seeds)} seeds")
    _say(f"{config.name}: {len(plan)} trials ({shape}, "
         f"budget {config.budget}: {config.train.steps} steps per data set), {done} already finished, {pending} to run")
    _say(f"each trial: {res.workers} worker(s) x {res.cpus_per_worker} CPU" + (" + 1 GPU" if res.use_gpu else "")
         + (", in its own process" if res.workers == 1 else ", on Ray Train"))
    _say(f"results: {run.out} (tables, summary.json); logs: {run.logs} (driver.log, one per trial)")


def _run_trials(run: StudyRun, pending: list[Trial], done: dict[str, TrialRecord], planned: int
                ) -> tuple[int, dict[str, TrialRecord]]:
    """Ray started (or joined), the pretrained model made, then one Tune trial per pending trial.
    Finished trials' records go into `done`; returns the concurrency and the failed trials' records."""
    from ray import tune

    config, seconds = run.config, run.seconds
    started = time.perf_counter()
    slots = start_for_study(config, run.verbose)
    seconds.ray_init = time.perf_counter() - started
    _say(f"running up to {slots} trials at once")
    init = _pretrain(run) if config.pretrain else None
    seconds.pretrain = time.perf_counter() - started - seconds.ray_init
    in_process = config.train.resources.workers == 1
    specs = [TrialSpec(trial=t, config=trial_config(config, t, run.out, run.state.tracking_uri, init).model_dump(mode="json"),
                       parent_run_id=run.state.parent_run_id, study=config.name, log=run.log(t),
                       in_process=in_process).to_json() for t in pending]
    tuner = tune.Tuner(
        tune.with_resources(run_trial, trial_resources(config)),
        param_space={"spec": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, reuse_actors=in_process),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}", storage_path=str(run.out / "ray"), verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.scheduling.max_retries),
            callbacks=[_Progress(len(pending), len(done), planned)],
        ),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds.trials = time.perf_counter() - started
    failed: dict[str, TrialRecord] = {}
    for result in results:
        if not result.config:
            continue
        spec = TrialSpec.from_json(result.config["spec"])
        if result.error is None and result.metrics and "record" in result.metrics:
            record = TrialRecord.from_json(json.loads(result.metrics["record"]))
            done[record.trial_id] = record
        else:
            failed[spec.trial.trial_id] = _failed_record(spec.trial, result.error, spec.log)
    return slots, failed


def _records(run: StudyRun, plan: list[Trial], done: dict[str, TrialRecord], failed: dict[str, TrialRecord]
             ) -> list[TrialRecord]:
    """One record per planned trial, in plan order: finished, or failed with its error and MLflow run."""
    from omgseg.platform.tracking import child_runs

    runs = child_runs(run.state.tracking_uri, run.state.parent_run_id) if len(done) < len(plan) else {}
    records = []
    for trial in plan:
        if trial.trial_id in done:
            records.append(done[trial.trial_id])
            continue
        record = failed.get(trial.trial_id) or _failed_record(trial, None, run.log(trial))
        record.mlflow_run_id = runs.get(trial.trial_id, (None, None))[0]
        records.append(record)
    return records


def _pretrain(run: StudyRun) -> Path:
    """The study's pretrained model: trained once (in this process for one worker, else on Ray
    Train), as a child run tagged omgseg.kind=pretrain; a resumed study reuses it."""
    from omgseg.platform.study.plan import pretrain_config
    from omgseg.platform.training.train import run_training

    config, logs = run.config, run.logs
    pretrain = pretrain_config(config, run.out, run.state.tracking_uri)
    done = pretrain.output_dir / pretrain.name / "latest" / "model.pt"
    if done.is_file():
        _say(f"pretrained model: {done} (from an earlier run of this study)")
        return done
    _say(f"pretraining {pretrain.steps} steps on {', '.join(pretrain.mix)} (log: {logs / 'pretrain.log'})")
    with redirect_output(logs / "pretrain.log"):
        result = run_training(pretrain, parent_run_id=run.state.parent_run_id, tags={"omgseg.kind": "pretrain"}, prepare=False,
                              in_process=config.train.resources.workers == 1, quiet=True)
    _say(f"pretrained model: {result.checkpoint}")
    return result.checkpoint


def _failed_record(trial: Trial, error: BaseException | None, log: str) -> TrialRecord:
    return TrialRecord(trial_id=trial.trial_id, combination=trial.combination, datasets=list(trial.datasets),
                       ratios=list(trial.ratios), seed=trial.seed, steps=trial.steps, status="failed", mixture=trial.mixture,
                       measures_affinity=trial.measures_affinity, log=log,
                       error=error_line(str(error)) if error is not None else "did not finish")


def _trial_error(trial) -> str:
    """The text of a trial's errors. Tune writes it to the driver's staging folder at once and
    copies it to the study's storage later; get_error() reads storage, so at a retry it would
    still find nothing."""
    staged = trial.error_file
    if staged and Path(staged).is_file():
        return Path(staged).read_text()
    return str(trial.get_error() or "")


class _Progress(Callback):
    """Ray Tune callback: the study's progress as one bar (a terminal) or one line per event,
    one line per finished trial with its time and validation losses, and every failure with
    its error and the path of its log."""

    def __init__(self, pending: int, already: int, total: int) -> None:
        from tqdm import tqdm

        self.total, self.already, self.pending = total, already, pending
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=already, unit="trial", file=sys.stderr) if sys.stderr.isatty() else None
        self.records: dict[str, dict] = {}

    def _status(self) -> str:
        ended = self.done + self.failed
        ran = time.perf_counter() - self.started
        eta = f", ETA {elapsed(ran / ended * (self.pending - ended))}" if ended else ""
        return (f"{self.already + ended}/{self.total} ended, {len(self.running)} running, {self.failed} failed, "
                f"{elapsed(ran)}{eta}")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[study] {text}")
            self.bar.set_postfix_str(self._status())
        else:
            _say(f"{text} [{self._status()}]")

    def on_trial_start(self, iteration, trials, trial, **info):
        # A start is shown in the terminal's bar only: a log keeps one line per trial, its end.
        self.running.add(trial.trial_id)
        if self.bar is not None:
            self.bar.set_postfix_str(self._status())

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        spec = trial.config["spec"]
        self._line(f"retrying {spec['trial']['trial_id']} after: {error_line(_trial_error(trial) or 'a failure')} "
                   f"(log: {spec['log']})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "record" in result:
            self.records[trial.trial_id] = json.loads(result["record"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        record = self.records.get(trial.trial_id, {})
        evaluation = Evaluation.from_json(record.get("metrics", {}), "trial record")
        losses = " ".join(f"{d}/{group}={loss:.3f}" for d, e in evaluation.datasets.items() for group, loss in e.losses.items())
        self._line(f"finished {record.get('trial_id', trial.config['spec']['trial']['trial_id'])} in "
                   f"{elapsed(record.get('wall_seconds', 0))}: val loss {losses}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed += 1
        spec = trial.config["spec"]
        self._line(f"FAILED {spec['trial']['trial_id']}: {error_line(_trial_error(trial) or 'failed')} "
                   f"(log: {spec['log']})")

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The command line


def build_parser(prog: str = "omgseg study") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a co-training study: one Ray Tune trial per (data set combination, seed), MLflow "
        "child runs under one parent, and the influence tables (runs, metrics, influence, correlation, "
        "affinity) as Parquet, with summary.json (significance, A/A check, cheap vs exhaustive estimate).",
        epilog="examples:\n  python studies/cotrain_matrix.py\n"
        "  python studies/cotrain_matrix.py --config studies/configs/default.yaml --out outputs/studies/mine\n"
        "  python studies/cotrain_matrix.py --resume            # after the driver was interrupted\n"
        "  python studies/cotrain_matrix.py --config studies/configs/omgseg_paper.yaml --dry-run\n"
        "  RAY_ADDRESS=ray://head:10001 python studies/cotrain_matrix.py --config ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="study config YAML (default: the embedded default study)")
    parser.add_argument("--out", help="study folder for the tables (default: outputs/studies/<study name>/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the study in --out (finished trials are kept); starts it if there is none")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (trials, resources, estimated hours) and stop")
    parser.add_argument("--verbose", action="store_true", help="stream Ray's, Tune's and the trials' own logs to the console")
    parser.add_argument("--verify", action="store_true",
                        help="train the study's recommendation (omgseg recommend) against the uniform mixture, the target "
                        "alone and the config's verify.baselines at every seed, into --out/verify/<objective>/")
    parser.add_argument("--objective", help="with --verify: the recommendation to verify (default: the study's first)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seeds=[0,1]")
    return parser


def main(argv: list[str] | None = None, prog: str = "omgseg study") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = load_config(StudyConfig, args.config, args.overrides)
        if args.dry_run:
            print(json.dumps(dry_run(config, prepared_sizes(config)), indent=1))
            return 0
        if args.verify:
            from omgseg.platform.study.verify import describe, verify_study

            verification = verify_study(config, study_dir(config, Path(args.out) if args.out else None), args.objective,
                                        verbose=args.verbose)
            for line in describe(verification):
                _say(line)
            return 0
        result = run_study(config, Path(args.out) if args.out else None, resume=args.resume, source=args.config,
                           verbose=args.verbose)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0 if not result.summary.failed else 1


