"""Uneven shard counts must not hang distributed training: two real gloo processes on
loopback, each doing one collective per sample (as DDP does per step), over 5 shards."""

import json
import os
import socket
import subprocess
import sys
import textwrap

from toydata import SOURCE, TOY_META, tiny_clip

from omgseg.datasets.shard_writer import write_shards

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from omgseg.datasets.stream import ShardStream

    shard_dir, epoch_samples, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    stream = ShardStream(shard_dir, repeat=True, epoch_samples=epoch_samples, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         collate_fn=lambda x: x)
    steps, keys = 0, []
    for sample in loader:
        total = torch.ones(1)
        dist.all_reduce(total)  # a rank with fewer samples would leave the other one waiting here
        steps += 1
        keys.append(sample.key)
    dist.barrier()
    print(json.dumps({"rank": dist.get_rank(), "steps": steps, "keys": keys}))
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(shard_dir, epoch_samples: int, workers: int) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(shard_dir), str(epoch_samples), str(workers)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    return sorted(results, key=lambda r: r["rank"])


def test_uneven_shards_do_not_hang_two_gloo_ranks(tmp_path):
    write_shards([tiny_clip(i) for i in range(13)], tmp_path, meta=TOY_META, source=SOURCE,
                 samples_per_shard=3)  # 5 shards: 3, 3, 3, 3, 1 samples
    for workers in (0, 2):
        ranks = _run_two_ranks(tmp_path, epoch_samples=7, workers=workers)
        assert [r["steps"] for r in ranks] == [7, 7], (workers, ranks)
        # The two ranks draw different shards (seeded by rank), not the same stream twice.
        assert ranks[0]["keys"] != ranks[1]["keys"]
