"""Benchmark: the TAG probe's cost as the number of co-trained data sets n grows (4, 6, 8).

A probe takes 1 + n look-aheads, each scored on the n targets' held-out batches, so its time
grows about as n (n + 1); what it keeps on the device should not. For each n, on the tiny
model with n synthetic data sets (random clips with one mask each, at --size):
- probe_s: seconds per probe (one `lookahead_affinity` call, the median of --repeats), with the
  held-out batches and maps kept on the host (the default) and on the device; on this CPU the
  two are the same memory, so their ratio is the cost of the per-batch moves, about 1;
- resident_mb: megabytes of held-out images and CLIP maps that stay on the device between
  probes: every target's when kept on the device (grows with n), none when kept on the host,
  where the device holds one batch's (transient_mb) at a time;
- identical: the Z matrices of both placements are equal.
Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_probe.py [--sizes 4 6 8] [--size 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from omgseg.core.structures import Category
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.model.structures import MatchTargets, PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.training.affinity import HeldOut, held_out_bytes, lookahead_affinity
from omgseg.platform.training.batches import TrainBatch


def _batch(seed: int, clips: int, size: int) -> TrainBatch:
    """`clips` one-frame clips, each with one square thing of a label 1-3."""
    examples = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(clips):
        masks = torch.zeros(1, 1, size, size, dtype=torch.bool)
        top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        masks[0, 0, top:top + size // 2, left:left + size // 2] = True
        label = int(torch.randint(0, 3, (), generator=g))
        examples.append(TrainBatch(
            images=torch.randint(0, 256, (1, 1, 3, size, size), dtype=torch.uint8, generator=g),
            targets=[MatchTargets(labels=torch.tensor([label]), masks=masks, track_ids=torch.tensor([1]), seed=seed)],
            prompts=[PromptBatch(torch.zeros(0, 4), (), (size, size))], datasets=("x",)))
    return TrainBatch(images=torch.cat([e.images for e in examples]), targets=[t for e in examples for t in e.targets],
                      prompts=[p for e in examples for p in e.prompts], datasets=tuple("x" for _ in examples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8], help="numbers of data sets n")
    parser.add_argument("--size", type=int, default=128, help="clip side in pixels")
    parser.add_argument("--probe-clips", type=int, default=2, help="clips of a source's probe batch")
    parser.add_argument("--heldout-clips", type=int, default=4, help="clips of a target's held-out batch")
    parser.add_argument("--forward", type=int, default=2, help="clips per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny")).train()
    vocabulary = Vocabulary.from_categories([Category(k, f"thing{k}", True) for k in (1, 2, 3)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(2):  # Adam's moments set, as in a run
        optimizer.zero_grad()
        batch = _batch(1000 + step, args.forward, args.size)
        sum(model.loss(model(batch.images, vocabulary, batch.prompts), batch.targets).values()).backward()
        optimizer.step()

    def split(seed: int, clips: int) -> list[TrainBatch]:
        return [_batch(seed * 100 + k, min(args.forward, clips - k), args.size) for k in range(0, clips, args.forward)]

    out: dict = {"benchmark": "bench_probe", "size": args.size, "probe_clips": args.probe_clips,
                 "heldout_clips": args.heldout_clips, "forward": args.forward}
    for n in args.sizes:
        names = [f"d{k}" for k in range(n)]
        probes = {name: split(k, args.probe_clips) for k, name in enumerate(names)}
        row: dict = {}
        zs = {}
        for keep in ("host", "device"):
            heldout = {name: HeldOut.cached(model, split(50 + k, args.heldout_clips), vocabulary, keep=keep)
                       for k, name in enumerate(names)}
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                zs[keep] = lookahead_affinity(model, optimizer, vocabulary, probes, heldout, grad_clip=0.01)
                seconds.append(time.perf_counter() - started)
            row[f"probe_s_{keep}"] = round(statistics.median(seconds), 2)
            everything = sum(held_out_bytes(h) for h in heldout.values()) / 2 ** 20
            first_batch = heldout[names[0]]
            one_batch = held_out_bytes(HeldOut(first_batch.batches[:1], vocabulary, first_batch.towers[:1]))
            row[f"resident_mb_{keep}"] = round(everything if keep == "device" else 0.0, 2)
            if keep == "host":
                row["transient_mb_host"] = round(one_batch / 2 ** 20, 2)
        row["host_vs_device"] = round(row["probe_s_host"] / row["probe_s_device"], 3)
        row["identical"] = bool(torch.equal(zs["host"], zs["device"]))
        out[f"n{n}"] = row
    first = args.sizes[0]
    out["probe_s_growth"] = {f"n{n}": round(out[f"n{n}"]["probe_s_host"] / out[f"n{first}"]["probe_s_host"], 2)
                             for n in args.sizes}
    out["lookahead_forwards_growth"] = {f"n{n}": round(n * (n + 1) / (first * (first + 1)), 2) for n in args.sizes}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
