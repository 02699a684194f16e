"""The co-training study: one Ray Tune trial per (data set combination, seed), each a Ray Train
run of `omgseg train`, tracked as child runs of one MLflow parent run; then the result tables.

    plan_trials(config)   -> the trials (combinations x seeds), with mixing ratios
    run_study(config, out) -> trains what is not finished yet, writes the tables, returns them

MLflow is the ledger: a trial is done when its child run (tag omgseg.trial_id) is FINISHED and
holds trial.json. `--resume` therefore skips finished trials without re-running or duplicating
them, and continues an interrupted one in its own MLflow run and Ray Train run (Ray resumes
from the trial's last checkpoint).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from omgseg.platform.config import (
    AffinityConfig,
    ConfigError,
    ScalingSpec,
    StudyConfig,
    TrainConfig,
    flatten,
    load_config,
)
from omgseg.platform.results import TABLES, TrialRecord, build_tables, compare_estimates, write_tables

STUDY_FILE = "study.json"
TRIAL_FILE = "trial.json"
SLOT = "trial_slot"  # the custom Ray resource a trial holds instead of CPUs (FIELD-NOTES: no Tune/Train deadlock)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "studies" / "configs" / "default.yaml"


@dataclass(frozen=True)
class Trial:
    trial_id: str  # "<combination>-s<seed>"
    datasets: tuple[str, ...]
    ratios: tuple[float, ...]  # normalised, in the order of `datasets`
    seed: int
    measures_affinity: bool

    @property
    def combination(self) -> str:
        return "+".join(self.datasets)


def combinations(config: StudyConfig) -> list[tuple[str, ...]]:
    """The study's combinations of train data sets, in config order, without repeats."""
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
    return out


def _ratios(config: StudyConfig, combo: tuple[str, ...], sizes: dict[str, int] | None) -> tuple[float, ...]:
    name = "+".join(combo)
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


def plan_trials(config: StudyConfig, sizes: dict[str, int] | None = None) -> list[Trial]:
    """Every (combination, seed). The trials on all train data sets measure TAG affinity; when
    no combination trains on all of them, one such trial per seed is added for it."""
    combos = combinations(config)
    everything = tuple(config.trained())
    if not combos:
        raise ValueError("the study plans no trial: check combinations and train_datasets")
    unknown = sorted(set(config.mixing.explicit) - {"+".join(c) for c in combos})
    if unknown:
        raise ValueError(f"mixing.explicit names combinations {unknown} that the study does not train "
                         f"({['+'.join(c) for c in combos]})")
    measuring = config.affinity.enabled and len(everything) > 1
    if measuring and everything not in combos:
        combos.append(everything)
    return [
        Trial(trial_id=f"{'+'.join(combo)}-s{seed}", datasets=combo, ratios=_ratios(config, combo, sizes), seed=seed,
              measures_affinity=measuring and combo == everything)
        for combo in combos for seed in config.seeds
    ]


def targets(config: StudyConfig) -> list[tuple[str, str, str]]:
    """(eval data set, task, metric) of the influence and correlation tables."""
    return [(name, task, metric) for name, tasks in config.evaluated().items() for task in tasks
            for metric in config.metrics.get(f"{name}/{task}", config.metrics.get(task, []))]


def trial_config(config: StudyConfig, trial: Trial, out: Path, uri: str) -> TrainConfig:
    """The TrainConfig of one trial; every path absolute (Ray runs trials in folders of their
    own) and MLflow at the study's tracking URI `uri`."""
    data = config.data.model_copy(update={"root": config.data.root.resolve()})
    model = config.train.model
    if model.clip_checkpoint is not None:
        model = model.model_copy(update={"clip_checkpoint": model.clip_checkpoint.resolve()})
    spec = config.train
    return TrainConfig(
        name=trial.trial_id, data=data, mix=dict(zip(trial.datasets, trial.ratios)), model=model, batch=spec.batch,
        optimizer=spec.optimizer, tracking=config.tracking.model_copy(update={"tracking_uri": uri}), steps=spec.steps,
        seed=trial.seed,
        scaling=ScalingSpec(workers=config.resources.workers, cpus_per_worker=config.resources.cpus_per_worker,
                            use_gpu=config.resources.use_gpu),
        log_every=spec.log_every, checkpoint_every=spec.checkpoint_every, keep_checkpoints=spec.keep_checkpoints,
        max_failures=spec.max_failures, eval_datasets=config.evaluated(), eval_samples=spec.eval_samples,
        affinity=AffinityConfig(every=config.affinity.every, lookahead_lr=config.affinity.lookahead_lr)
        if trial.measures_affinity else AffinityConfig(),
        output_dir=(out / "trials" / trial.trial_id).resolve(),
    )


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Ray Tune actor)


def run_trial(param: dict) -> None:
    """Ray Tune's function trainable: one Ray Train run, its record logged as trial.json."""
    from ray import tune

    from omgseg.platform.train import run_training

    spec = param["trial"]
    config = TrainConfig.model_validate(spec["config"])
    trial = Trial(spec["trial_id"], tuple(spec["datasets"]), tuple(spec["ratios"]), spec["seed"], spec["measures_affinity"])
    started = time.perf_counter()
    # A retried or resumed trial continues its own MLflow run instead of opening a second one.
    run_id = _child_runs(spec["tracking_uri"], spec["parent_run_id"]).get(trial.trial_id, (None, None))[0]
    tags = {"omgseg.trial_id": trial.trial_id, "omgseg.study": spec["study"]}
    result = run_training(config, parent_run_id=spec["parent_run_id"], tags=tags, run_id=run_id, prepare=False)
    record = TrialRecord(
        trial_id=trial.trial_id, combination=trial.combination, datasets=list(trial.datasets), ratios=list(trial.ratios),
        seed=trial.seed, steps=result.steps, status="finished", mlflow_run_id=result.run_id,
        measures_affinity=trial.measures_affinity, wall_seconds=time.perf_counter() - started, seconds=result.seconds,
        metrics=result.metrics, affinity=result.affinity, reads=result.reads,
    )
    _log_record(spec["tracking_uri"], record, config.output_dir)
    tune.report({"record": json.dumps(record.to_json())})


def _log_record(uri: str, record: TrialRecord, folder: Path) -> None:
    """trial.json next to the trial's outputs and as an artifact of its MLflow run (the ledger)."""
    import mlflow

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRIAL_FILE
    partial = folder / (TRIAL_FILE + ".partial")
    partial.write_text(json.dumps(record.to_json(), indent=1, sort_keys=True))
    partial.replace(path)
    mlflow.MlflowClient(uri).log_artifact(record.mlflow_run_id, str(path))


def _child_runs(uri: str, parent_run_id: str) -> dict[str, tuple[str, str]]:
    """{trial id: (run id, status)} of the parent's child runs (the newest per trial)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000, order_by=["attributes.start_time ASC"])
    return {r.data.tags["omgseg.trial_id"]: (r.info.run_id, r.info.status) for r in runs if "omgseg.trial_id" in r.data.tags}


def _finished_records(uri: str, parent_run_id: str) -> dict[str, TrialRecord]:
    """The records of FINISHED child runs that hold trial.json (MLflow is the ledger)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    out = {}
    for trial_id, (run_id, status) in _child_runs(uri, parent_run_id).items():
        if status != "FINISHED":
            continue
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(run_id, TRIAL_FILE, folder)
            except (OSError, mlflow.exceptions.MlflowException):
                continue  # finished training but killed before its record was logged: run it again
            out[trial_id] = TrialRecord.from_json(json.loads(Path(path).read_text()))
    return out


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class StudyResult:
    out: Path
    parent_run_id: str
    tracking_uri: str
    tables: dict[str, Path]
    summary: dict


def study_dir(config: StudyConfig, out: Path | None) -> Path:
    return (Path(out) if out is not None else Path("outputs/studies") / config.name).resolve()


def tracking_uri(config: StudyConfig, out: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the study folder."""
    from omgseg.platform.tracking import resolve_tracking_uri

    return resolve_tracking_uri(config.tracking, out)


def _concurrency(config: StudyConfig, total_cpus: float, total_gpus: float) -> int:
    if config.resources.max_concurrent_trials:
        return config.resources.max_concurrent_trials
    res = config.resources
    by_cpu = total_cpus // (res.workers * res.cpus_per_worker)
    by_gpu = total_gpus // res.workers if res.use_gpu else by_cpu
    return max(1, int(min(by_cpu, by_gpu)))


def _start_ray(config: StudyConfig) -> int:
    """Connect to $RAY_ADDRESS (omgseg.platform.cluster ships the wheel) or start a local Ray
    with `trial_slot` resources; returns how many trials may run at once. On a cluster, the
    head node must offer trial_slot."""
    import ray

    from omgseg.platform.cluster import connect

    local = not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    slots = _concurrency(config, float(os.cpu_count() or 1), float(_local_gpus())) if local else 0
    connect({SLOT: slots} if local else None)
    found = int(ray.cluster_resources().get(SLOT, 0))
    if found < 1:
        where = f"the Ray cluster at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "this Ray"
        raise RuntimeError(
            f"{where} has no {SLOT!r} resource: start its head node with "
            f"`ray start --head --resources='{{\"{SLOT}\": N}}'` for N concurrent trials (studies/cluster/)")
    return found


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _check_resume(out: Path, config: StudyConfig, resume: bool) -> dict | None:
    """The saved study state when resuming; raises when the folder and the flag disagree."""
    state_file = out / STUDY_FILE
    if not state_file.is_file():
        if resume:
            _say(f"--resume: no study at {out} yet, starting it")
        return None
    if not resume:
        raise ValueError(f"a study already exists at {out}: pass --resume to continue it, or --out for a new folder")
    state = json.loads(state_file.read_text())
    saved, now = flatten(state["config"]), flatten(json.loads(config.model_dump_json()))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"--resume: the config differs from the study's at {out} in {changed}")
    return state


def _say(text: str) -> None:
    print(f"[study] {text}", file=sys.stderr, flush=True)


def run_study(config: StudyConfig, out: Path | None = None, *, resume: bool = False, source: str = "config") -> StudyResult:
    """Plan, prepare data, train every unfinished trial on Ray Tune, write the tables."""
    import mlflow
    from ray import tune

    from omgseg.datasets.shards import read_manifest
    from omgseg.platform.data import prepare_data
    from omgseg.platform.tracking import experiment_id

    out = study_dir(config, out)
    clock = {"started": time.perf_counter()}
    plan_trials(config)  # a config that plans nothing fails before any data is made
    state = _check_resume(out, config, resume)
    for name in config.data.datasets:  # a data set that cannot be read fails before any trial starts
        spec = config.data.datasets[name]
        if spec.src is not None and not Path(spec.src).exists():
            raise FileNotFoundError(f"data set {name!r}: source folder {spec.src} does not exist")
    dirs = prepare_data(config.data, progress=True)
    clock["prepared"] = time.perf_counter()
    sizes = {name: read_manifest(splits["train"]).total_samples for name, splits in dirs.items() if "train" in splits}
    plan = plan_trials(config, sizes)
    uri = tracking_uri(config, out)
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    if state is None:
        parent = client.create_run(experiment_id(client, config.tracking.experiment, uri), run_name=config.name,
                                   tags={"omgseg.study": config.name, "omgseg.kind": "study"})
        state = {"name": config.name, "parent_run_id": parent.info.run_id, "tracking_uri": uri,
                 "config": json.loads(config.model_dump_json()), "source": source}
        (out / STUDY_FILE).write_text(json.dumps(state, indent=1))
        client.log_batch(parent.info.run_id, params=[
            mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())])
        config_file = out / "config.json"
        config_file.write_text(config.model_dump_json(indent=2))
        client.log_artifact(parent.info.run_id, str(config_file))
    else:
        client.update_run(state["parent_run_id"], status="RUNNING")
    parent_run_id = state["parent_run_id"]

    done = _finished_records(uri, parent_run_id)
    pending = [t for t in plan if t.trial_id not in done]
    _say(f"{config.name}: {len(plan)} trials, {len(done)} already finished, {len(pending)} to run; "
         f"tables go to {out}")
    failed: dict[str, str] = {}
    seconds = {"prepare": clock["prepared"] - clock["started"], "ray_init": 0.0, "trials": 0.0}
    if pending:
        started = time.perf_counter()
        slots = _start_ray(config)
        seconds["ray_init"] = time.perf_counter() - started
        _say(f"running up to {slots} trials at once ({config.resources.workers} worker(s) x "
             f"{config.resources.cpus_per_worker} CPU each)")
        specs = [{
            "trial_id": t.trial_id, "datasets": list(t.datasets), "ratios": list(t.ratios), "seed": t.seed,
            "measures_affinity": t.measures_affinity, "config": trial_config(config, t, out, uri).model_dump(mode="json"),
            "tracking_uri": uri, "parent_run_id": parent_run_id, "study": config.name,
        } for t in pending]
        tuner = tune.Tuner(
            tune.with_resources(run_trial, {SLOT: 1}),
            param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=slots),
            run_config=tune.RunConfig(
                name=f"tune-{int(time.time())}", storage_path=str(out / "ray"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=config.resources.max_retries),
                callbacks=[_Progress(len(plan), len(done))],
            ),
        )
        started = time.perf_counter()
        results = tuner.fit()
        seconds["trials"] = time.perf_counter() - started
        for result in results:
            spec = result.config["trial"] if result.config else None
            if spec is None:
                continue
            if result.error is None and result.metrics and "record" in result.metrics:
                record = TrialRecord.from_json(json.loads(result.metrics["record"]))
                done[record.trial_id] = record
            else:
                failed[spec["trial_id"]] = _one_line(result.error)
    records = []
    runs = _child_runs(uri, parent_run_id) if len(done) < len(plan) else {}
    for trial in plan:
        if trial.trial_id in done:
            records.append(done[trial.trial_id])
        else:
            records.append(TrialRecord(
                trial_id=trial.trial_id, combination=trial.combination, datasets=list(trial.datasets),
                ratios=list(trial.ratios), seed=trial.seed, steps=config.train.steps, status="failed",
                mlflow_run_id=runs.get(trial.trial_id, (None, None))[0], measures_affinity=trial.measures_affinity,
                error=failed.get(trial.trial_id, "did not finish")))
    return _finish(config, out, uri, parent_run_id, records, seconds)


def _one_line(error: BaseException | None) -> str:
    text = str(error) if error is not None else "no result reported"
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:500]


def _finish(config: StudyConfig, out: Path, uri: str, parent_run_id: str, records: list[TrialRecord],
            seconds: dict[str, float]) -> StudyResult:
    """Tables, summary.json, and both logged to the MLflow parent run (then closed)."""
    import mlflow

    started = time.perf_counter()
    tables = build_tables(config.name, records, config.trained(), targets(config))
    paths = write_tables(tables, out)
    seconds["tables"] = time.perf_counter() - started
    summary = {
        "study": config.name, "trials": len(records),
        "finished": sum(r.status == "finished" for r in records),
        "failed": [{"trial_id": r.trial_id, "error": r.error} for r in records if r.status != "finished"],
        "estimates": compare_estimates(tables["influence"], tables["affinity"], tables["runs"]),
        "tables": {k: str(v) for k, v in paths.items()},
        "mlflow": {"tracking_uri": uri, "parent_run_id": parent_run_id},
        "driver_seconds": seconds,  # this driver run (a resumed study: the last run only)
    }
    summary_file = out / "summary.json"
    partial = out / "summary.json.partial"
    partial.write_text(json.dumps(summary, indent=1))
    partial.replace(summary_file)
    client = mlflow.MlflowClient(uri)
    for path in [*paths.values(), summary_file]:
        client.log_artifact(parent_run_id, str(path), artifact_path="tables")
    now = int(time.time() * 1000)
    estimates = summary["estimates"]
    values = {"trials_finished": summary["finished"], "trials_failed": len(summary["failed"]),
              "exhaustive_trial_hours": estimates["exhaustive_trial_hours"],
              "affinity_trial_hours": estimates["affinity_trial_hours"]}
    if estimates["spearman"] is not None:
        values["affinity_vs_influence_spearman"] = estimates["spearman"]
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in values.items()])
    client.set_terminated(parent_run_id, "FINISHED" if not summary["failed"] else "FAILED")
    return StudyResult(out=out, parent_run_id=parent_run_id, tracking_uri=uri, tables=paths, summary=summary)


class _Progress(Callback):
    """A Tune callback that prints one line per trial that ends."""

    def __init__(self, total: int, already: int) -> None:
        self.total = total
        self.ended = already
        self.started = time.perf_counter()

    def _ended(self, trial, how: str) -> None:
        self.ended += 1
        _say(f"{self.ended}/{self.total} trials ended: {trial.config['trial']['trial_id']} {how} "
             f"({time.perf_counter() - self.started:.0f} s into this run)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "FAILED")


# ---------------------------------------------------------------------------------------------
# Plan printing and the command line


def dry_run(config: StudyConfig) -> dict:
    """The plan without starting anything: trials, resources, estimated hours."""
    plan = plan_trials(config)
    res = config.resources
    trial_hours = None
    gpu_hours = None
    if res.seconds_per_step:
        trial_hours = len(plan) * config.train.steps * res.seconds_per_step / 3600
        gpu_hours = trial_hours * res.workers if res.use_gpu else 0.0
    return {
        "study": config.name,
        "trials": [{"trial_id": t.trial_id, "mix": dict(zip(t.datasets, [round(r, 4) for r in t.ratios])),
                    "seed": t.seed, "measures_affinity": t.measures_affinity} for t in plan],
        "n_trials": len(plan),
        "per_trial": {"workers": res.workers, "cpus_per_worker": res.cpus_per_worker,
                      "gpus_per_worker": 1 if res.use_gpu else 0, "steps": config.train.steps},
        "max_concurrent_trials": res.max_concurrent_trials,
        "estimated_trial_hours": trial_hours,
        "estimated_gpu_hours": gpu_hours,
        "evaluation": config.evaluated(),
    }


def build_parser(prog: str = "omgseg study") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a co-training study: one Ray Tune trial per (data set combination, seed), MLflow "
        "child runs under one parent, and the influence tables (runs, metrics, influence, correlation, "
        "affinity) as Parquet.",
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
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seeds=[0,1]")
    return parser


def main(argv: list[str] | None = None, prog: str = "omgseg study") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = load_config(StudyConfig, args.config, args.overrides)
        if args.dry_run:
            print(json.dumps(dry_run(config), indent=1))
            return 0
        result = run_study(config, Path(args.out) if args.out else None, resume=args.resume, source=args.config)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    summary = result.summary
    estimates = summary["estimates"]
    _say(f"done: {summary['finished']}/{summary['trials']} trials finished"
         + (f", {len(summary['failed'])} failed: {[f['trial_id'] for f in summary['failed']]}" if summary["failed"] else ""))
    _say(f"tables: {', '.join(str(result.tables[t]) for t in TABLES)}")
    if estimates["spearman"] is not None:
        _say(f"affinity vs influence: Spearman {estimates['spearman']:.3f} over {estimates['n_pairs']} pairs; "
             f"cost {estimates['affinity_trial_hours']:.3f} vs {estimates['exhaustive_trial_hours']:.3f} trial-hours")
    _say(f"MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri}  (then http://127.0.0.1:5000, "
         f"parent run {result.parent_run_id})")
    print(json.dumps({"out": str(result.out), "parent_run_id": result.parent_run_id, "tracking_uri": result.tracking_uri,
                      "finished": summary["finished"], "failed": len(summary["failed"]),
                      "spearman_affinity_vs_influence": estimates["spearman"]}))
    return 0 if not summary["failed"] else 1

