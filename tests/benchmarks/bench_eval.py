"""Benchmark: evaluation at the scale of real data, on synthetic COCO of COCO's size (640x480).

Four measurements, each a ratio of two things measured in the same run:
- rss_ratio: peak resident memory of a fresh process evaluating 8N val clips against N (one
  worker; panoptic, instance and semantic metrics and the validation losses on 480x640 crops):
  streamed evaluation keeps it flat (goal <= 1.15);
- two_worker_ratio: wall time of the evaluation inside 2 Ray Train workers against 1 (every
  task of COCO, interactive clicks included; Ray's start-up excluded), with `identical` when
  the merged result equals the one worker's (goal <= 0.65);
- batched_speedup: clips per second at the default batch (`eval_batch_size`) against one clip
  a forward pass, in one process with one thread (goal >= 1.5 on a CPU); also on the default
  study's 96x128 clips;
- eval_share: with --study, the evaluation's share of the trials' wall time in a finished
  study folder (e.g. the one tests/benchmarks/bench_study.py leaves).
Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_eval.py [--clips 4] [--study DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from omgseg.datasets.convert import convert
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.model.checkpoint import save_checkpoint
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.platform.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
ALL_TASKS = ["panoptic", "instance", "semantic", "interactive"]


def _config(root: Path, shards: Path, tasks: list[str], **keys) -> TrainConfig:
    """A run evaluated on `shards` (synthetic COCO val shards) only."""
    return TrainConfig.model_validate({
        "name": "bench_eval", "output_dir": str(root / "runs"), "mix": {"coco": 1.0}, "evaluation": {"coco": tasks},
        "data": {"root": str(root), "datasets": {"coco": {
            "format": "coco-panoptic", "shards": f"{shards.parent}/{{split}}"}}},
        **keys,
    })


def _data(root: Path, clips: int, height: int, width: int) -> Path:
    sizes = SynthSizes(height=height, width=width, coco_train=1, coco_val=clips, ade_train=1, ade_val=1,
                       video_train=1, video_val=1)
    source = write_synthetic(root / "synth", ["coco-panoptic"], seed=0, sizes=sizes)["coco-panoptic"]
    out = root / "shards" / "val"
    convert("coco-panoptic", source, out, "val", samples_per_shard=8)
    return out


def _peak_rss_mb(config_file: Path, checkpoint: Path, clips: int) -> float:
    """Peak resident memory (MB) of a fresh process evaluating the first `clips` val clips."""
    code = (
        "import json, resource, sys, torch\n"
        "from omgseg.model.checkpoint import load_checkpoint\n"
        "from omgseg.platform.config import TrainConfig\n"
        "from omgseg.platform.evaluation.evaluate import evaluate_run\n"
        "torch.set_num_threads(1)\n"
        "config = TrainConfig.model_validate_json(open(sys.argv[1]).read())\n"
        "config = config.model_copy(update={'eval_samples': int(sys.argv[3]), 'val_samples': int(sys.argv[3])})\n"
        "model, _ = load_checkpoint(sys.argv[2])\n"
        "evaluate_run(model, config)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(config_file), str(checkpoint), str(clips)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _worker(loop_config: dict) -> None:
    """A Ray Train worker: its share of the evaluation, timed from a common start."""
    import ray.train

    from omgseg.model.checkpoint import load_checkpoint
    from omgseg.platform.evaluation.evaluate import Share, evaluate_run

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = TrainConfig.model_validate(loop_config["config"])
    model, _ = load_checkpoint(loop_config["checkpoint"])
    if world > 1:
        torch.distributed.barrier()
    started = time.perf_counter()
    result = evaluate_run(model, config, Share(rank, world))
    if rank == 0:
        Path(loop_config["out"]).write_text(json.dumps({"seconds": time.perf_counter() - started,
                                                         "evaluation": result.to_json()}))


def _on_ray_train(config: TrainConfig, checkpoint: Path, workers: int, out: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker, train_loop_config={"config": config.model_dump(mode="json"), "checkpoint": str(checkpoint),
                                    "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-eval-{workers}", storage_path=str(out.parent / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads(out.read_text())


def _clips_per_second(config: TrainConfig, model: OMGSeg, batch_size: int, tasks: list[str]) -> float:
    from omgseg.platform.evaluation.evaluate import EvalSettings, evaluate_dataset

    settings = EvalSettings(batch_size=batch_size, task_samples=config.eval_samples, loss_samples=config.val_samples,
                            clips=config.batch)
    warm_up = EvalSettings(batch_size=batch_size, task_samples=batch_size, loss_samples=batch_size, clips=config.batch)
    evaluate_dataset(model, "coco", config.data.shard_dir("coco", "val"), tasks, warm_up)  # caches, allocator
    started = time.perf_counter()
    state = evaluate_dataset(model, "coco", config.data.shard_dir("coco", "val"), tasks, settings)
    return state.clips / (time.perf_counter() - started)


def _eval_share(study: Path) -> float:
    import polars as pl

    runs = pl.read_parquet(study / "runs.parquet").filter(pl.col("status") == "finished")
    return float(runs["eval_seconds"].sum() / runs["wall_seconds"].sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="N of the memory comparison (8N against N)")
    parser.add_argument("--ray-clips", type=int, default=16, help="val clips of the Ray Train comparison")
    parser.add_argument("--study", help="a finished study folder: report its evaluation share")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out: dict = {"benchmark": "bench_eval"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = OMGSeg(model_config("tiny"))
        checkpoint = save_checkpoint(model, root / "model.pt")
        big = _data(root / "coco640", 8 * args.clips, 480, 640)
        default_batch = TrainConfig.model_fields["eval_batch_size"].default

        # Memory: the first N and the first 8N clips, each in a fresh process.
        memory = _config(root, big, ["panoptic", "instance", "semantic"], batch={"crop": [480, 640]})
        (root / "memory.json").write_text(memory.model_dump_json())
        small, large = (_peak_rss_mb(root / "memory.json", checkpoint, n) for n in (args.clips, 8 * args.clips))
        out.update(clips=[args.clips, 8 * args.clips], peak_rss_mb=[round(small), round(large)],
                   rss_ratio=round(large / small, 3))

        # Batching: clips per second at the default batch against one clip a forward pass.
        torch.set_num_threads(1)
        for name, shards, crop in (("", big, [480, 640]), ("_small", _data(root / "coco128", 16, 96, 128), [96, 128])):
            config = _config(root, shards, ALL_TASKS, batch={"crop": crop}, eval_samples=16, val_samples=16)
            one, batched = (_clips_per_second(config, model, b, ALL_TASKS) for b in (1, default_batch))
            out[f"clips_per_s{name}"] = {"batch_1": round(one, 2), f"batch_{default_batch}": round(batched, 2)}
            out[f"batched_speedup{name}"] = round(batched / one, 2)

        # Workers: the evaluation inside 1 and 2 Ray Train workers (1 CPU each).
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            config = _config(root, big, ALL_TASKS, eval_samples=args.ray_clips, val_samples=args.ray_clips)
            one, two = (_on_ray_train(config, checkpoint, w, root / f"ray{w}.json") for w in (1, 2))
        finally:
            ray.shutdown()
        out.update(ray_clips=args.ray_clips, eval_seconds={"1_worker": round(one["seconds"], 2),
                                                            "2_workers": round(two["seconds"], 2)},
                   two_worker_ratio=round(two["seconds"] / one["seconds"], 3),
                   identical=one["evaluation"] == two["evaluation"])
    if args.study:
        out["eval_share"] = round(_eval_share(Path(args.study)), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
