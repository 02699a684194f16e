"""Benchmark: the default study end to end. Where does its wall time go?

Runs `python studies/cotrain_matrix.py` (the embedded default study, or --config) into a fresh
folder, then compares, in the same run, the time spent inside training steps (and the TAG
probes and evaluation, measured in the trials) with the rest: inside each trial (Ray start-up
of the trial, model building, checkpoints, MLflow), and, in the trial slots, the time no trial
ran (Tune's scheduling, actor start-up). Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_study.py [--config FILE] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from omgseg.platform.records import StudySummary

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "studies" / "configs" / "default.yaml"))
    parser.add_argument("--out", help="study folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_study_")) / "study"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--config", args.config,
                           "--out", str(out), *args.overrides], stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(f"bench_study: the study failed (exit {done.returncode})", file=sys.stderr)
        return 1
    runs = pl.read_parquet(out / "runs.parquet").filter(pl.col("status") == "finished")
    summary = StudySummary.read(out)
    trial_wall = float(runs["wall_seconds"].sum())
    steps = float(runs["train_seconds"].sum())
    probes = float(runs["affinity_seconds"].sum())
    evaluation = float(runs["eval_seconds"].sum())
    overhead = trial_wall - steps - probes - evaluation
    slots = summary.concurrent_trials or 1
    slot_seconds = slots * summary.driver_seconds["trials"]
    idle = max(0.0, slot_seconds - trial_wall)
    estimates = summary.estimates
    primary = {k: v for k, v in summary.significant.items() if k.startswith("primary")}
    print(json.dumps({
        "benchmark": "bench_study",
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "trials": runs.height,
        "study_wall_s": round(wall, 1),
        "trial_wall_s_sum": round(trial_wall, 1),
        "concurrency": round(trial_wall / wall, 2),
        "inside_steps_s": round(steps, 1),
        "affinity_probes_s": round(probes, 1),
        "evaluation_s": round(evaluation, 1),
        "ray_startup_and_scheduling_s": round(overhead, 1),
        "share_inside_steps": round(steps / trial_wall, 3),
        "share_evaluation": round(evaluation / trial_wall, 3),
        "share_ray_overhead": round(overhead / trial_wall, 3),
        "idle_slot_s": round(idle, 1),
        "share_ray_overhead_with_idle_slots": round((overhead + idle) / (trial_wall + idle), 3),
        "overhead_over_steps": round(overhead / steps, 2),
        "driver_s": {k: round(v, 1) for k, v in summary.driver_seconds.items()},
        "trials_per_hour": round(runs.height / (wall / 3600), 1),
        "study_folder_gb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9, 2),
        "weights_files_gb": round(sum(f.stat().st_size for f in out.rglob("*.pt") if f.is_file()) / 1e9, 2),
        "seeds": summary.seeds,
        "significant_primary": {k: f"{v.significant_after_correction}/{v.tested}" for k, v in primary.items()},
        "median_mde_primary": {k: v.median_mde for k, v in primary.items()},
        "median_mde_adjusted_primary": {k: v.median_mde_adjusted for k, v in primary.items()},
        "planted": {"kind": summary.planted.kind, "agree": summary.planted.agree, "total": summary.planted.total,
                    "recovered": summary.planted.recovered,
                    "false_positives_on_none": summary.planted.false_positives_on_none} if summary.planted else None,
        "null_check": {k: v.passed for k, v in summary.null_check.items()},
        "pairing_ratio_median": summary.pairing_ratio_median,
        "spearman_affinity_vs_influence": estimates.spearman,
        "exhaustive_trial_hours": round(estimates.exhaustive_trial_hours, 4),
        "affinity_trial_hours": round(estimates.affinity_trial_hours, 4),
        "out": str(out),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
