"""Evaluation shared out between workers: two gloo ranks on loopback give exactly the numbers
of one process for every task's metrics and the validation losses; shares, batches and the
typed record."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from omgseg.datasets.convert import convert
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.model.checkpoint import save_checkpoint
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.platform.config import TrainConfig
from omgseg.platform.evaluation.evaluate import EvalSettings, Share, ValClips, evaluate_dataset
from omgseg.platform.records import Evaluation

SIZES = SynthSizes(coco_train=1, coco_val=4, ade_train=1, ade_val=1, video_train=1, video_val=2, min_frames=5,
                   max_frames=6)
FORMATS = {"coco": "coco-panoptic", "vipseg": "vipseg", "davis": "davis"}
EVALUATION = {"coco": ["panoptic", "instance", "semantic", "interactive"], "vipseg": ["video_panoptic", "video_instance"],
              "davis": ["vos"]}

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from omgseg.model.checkpoint import load_checkpoint
    from omgseg.platform.config import TrainConfig
    from omgseg.platform.evaluation.evaluate import Share, evaluate_run

    torch.set_num_threads(1)
    config = TrainConfig.model_validate_json(open(sys.argv[1]).read())
    model, _ = load_checkpoint(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    result = evaluate_run(model, config, Share(int(os.environ.get("RANK", "0")), world))
    if result is not None:
        print(json.dumps(result.to_json()))
    if world > 1:
        dist.destroy_process_group()  # gloo's threads left running at exit can abort the process
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_eval")
    sources = write_synthetic(root / "synth", list(FORMATS.values()), seed=0, sizes=SIZES)
    datasets = {}
    for name, fmt in FORMATS.items():
        clip_length = None if fmt == "coco-panoptic" else 3
        convert(fmt, sources[fmt], root / "data" / "shards" / name / "val", "val", samples_per_shard=2,
                clip_length=clip_length)
        datasets[name] = {"format": fmt, "src": str(sources[fmt]), "clip_length": clip_length}
    config = TrainConfig.model_validate({
        "name": "eval", "data": {"root": str(root / "data"), "datasets": datasets},
        "mix": {"coco": 1.0}, "evaluation": EVALUATION, "eval_batch_size": 2, "output_dir": str(root / "runs"),
        "batch": {"frames": 2, "crop": [64, 96], "prompts_per_clip": 2},
    })
    (root / "config.json").write_text(config.model_dump_json())
    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny"))
    return root, config, model, save_checkpoint(model, root / "model.pt")


def _evaluate_alone_and_shared(root, checkpoint) -> tuple[str, str, str]:
    """The evaluation's output by one process, and by rank 0 and rank 1 of two (all at once)."""
    port = _free_port()
    procs = []
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(root / "config.json"), str(checkpoint)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            outputs.append(out.strip())
    finally:
        for proc in procs:
            proc.kill()
    return tuple(outputs)


def test_two_gloo_workers_give_exactly_the_numbers_of_one(setup):
    root, config, _, checkpoint = setup
    one, rank0, rank1 = _evaluate_alone_and_shared(root, checkpoint)
    assert rank1 == ""  # only rank 0 gets the merged result
    whole, shared = Evaluation.from_json(json.loads(one)), Evaluation.from_json(json.loads(rank0))
    assert shared.to_json() == whole.to_json()  # exactly, per-class tables included
    for name, tasks in EVALUATION.items():
        assert set(whole.datasets[name].tasks) == set(tasks)
    losses = {(s.dataset, s.task) for s in whole.scores() if s.metric == "val_loss"}
    assert losses == {("coco", "object_queries"), ("coco", "prompt_queries"), ("vipseg", "object_queries"),
                      ("davis", "prompt_queries")}
    assert whole.datasets["coco"].tasks["interactive"]["instances"] > 0
    assert whole.datasets["davis"].tasks["vos"]["objects"] > 0


def test_shares_are_contiguous_runs_of_whole_batches():
    for total, batch, world in ((10, 4, 2), (10, 4, 3), (3, 4, 2), (0, 2, 2), (17, 1, 4)):
        bounds = [Share(r, world).bounds(total, batch) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # disjoint and covering, in rank order
        assert all(start % batch == 0 for start, _ in bounds)
    assert [Share(r, 2).bounds(10, 4) for r in range(2)] == [(0, 4), (4, 10)]


def test_a_share_reads_only_its_clips_across_shard_boundaries(setup):
    root, config, _, _ = setup
    clips = ValClips(config.data.shard_dir("coco", "val"))
    assert clips.total == 4 and len(clips.shards) == 2
    everything = [(i, s.key) for i, s in clips.read()]
    assert [i for i, _ in everything] == list(range(4))
    assert [(i, s.key) for i, s in clips.read(1, 4)] == everything[1:4]


def test_batched_validation_losses_are_each_clips_own(setup):
    root, config, model, _ = setup
    tasks = EVALUATION["coco"]
    settings = EvalSettings.of(config)
    one = evaluate_dataset(model, "coco", config.data.shard_dir("coco", "val"), ["panoptic"] + tasks[3:],
                           EvalSettings(1, 0, None, settings.clips))
    four = evaluate_dataset(model, "coco", config.data.shard_dir("coco", "val"), ["panoptic"] + tasks[3:],
                            EvalSettings(4, 0, None, settings.clips))
    assert one.losses.counts == four.losses.counts
    assert four.losses.means() == pytest.approx(one.losses.means(), rel=1e-4)
