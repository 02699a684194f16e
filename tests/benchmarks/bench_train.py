"""Benchmark: the training loop under Ray Train against the same loop in a plain process.

Three runs of the tiny model on the synthetic shards, each logging samples/s per window of
`--log-every` steps: (a) `train_loop` called directly in this process with one torch thread,
(b) Ray Train with 1 worker of 1 CPU, (c) Ray Train with 2 workers. Steady-state throughput is
the median over windows after the first (start-up, caches). Ray's overhead ratio is a / b
(time per step, b over a); scaling is c over b. Prints one JSON line.

    python tests/benchmarks/bench_train.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from omgseg.platform.config import TrainConfig, load_config
from omgseg.platform.data import prepare_data
from omgseg.platform.training.loop import StepLog, build_parts, train_loop
from omgseg.platform.training.train import run_training

CONFIG = Path(__file__).resolve().parents[2] / "studies" / "configs" / "train_tiny.yaml"


class _Recorder:
    """Collects the loop's logged metrics (stands in for the MLflow logger)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def __call__(self, metrics: dict[str, float], step: int, steps: int) -> None:
        self.rates.append(metrics["samples_per_s"])


def _steady(rates: list[float]) -> float:
    if len(rates) < 2:
        raise ValueError(f"need at least 2 logged windows, got {len(rates)}: raise --steps")
    return statistics.median(rates[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        base = [f"data.root={tmp}/data", f"output_dir={tmp}/runs", f"steps={args.steps}",
                f"log_every={args.log_every}", f"checkpoint_every={args.steps}", "optimizer.warmup_steps=5", "evaluation={}"]
        one = load_config(TrainConfig, CONFIG, [*base, "resources.workers=1"])
        prepare_data(one.data)

        torch.set_num_threads(1)  # as a Ray worker with 1 CPU gets
        recorder = _Recorder()
        parts, state = build_parts(one, 0, 1, torch.device("cpu"))
        train_loop(parts, state, [StepLog(parts, [recorder])])
        plain = _steady(recorder.rates)
        print(f"plain: {plain:.2f} samples/s", file=sys.stderr)

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        results = {}
        for workers in (1, 2):
            config = load_config(TrainConfig, CONFIG, [*base, f"resources.workers={workers}", f"name=bench_w{workers}"])
            result = run_training(config)
            import mlflow

            history = mlflow.MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "samples_per_s")
            results[workers] = _steady([m.value for m in sorted(history, key=lambda m: m.step)])
            print(f"ray, {workers} worker(s): {results[workers]:.2f} samples/s", file=sys.stderr)

    batch = one.batch.batch_size
    print(json.dumps({
        "benchmark": "bench_train",
        "steps": args.steps,
        "batch_per_worker": batch,
        "plain_steps_per_s": round(plain / batch, 3),
        "ray_1_worker_steps_per_s": round(results[1] / batch, 3),
        "ray_overhead_ratio": round(plain / results[1], 3),
        "ray_1_worker_samples_per_s": round(results[1], 2),
        "ray_2_workers_samples_per_s": round(results[2], 2),
        "scaling_2_over_1": round(results[2] / results[1], 3),
    }))


if __name__ == "__main__":
    main()
