"""Benchmark: our PQ against torchmetrics' PanopticQuality on the same synthetic pairs.

Pairs have no void and no crowd and only thing classes, where the two definitions agree
(docs/reference.md, Metrics), so the numbers must be equal; the timing ratio is what this measures.
Prints one JSON line.

    python tests/benchmarks/bench_metrics.py [--pairs 300] [--size 128]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torchmetrics.detection import PanopticQuality

from omgseg.core.structures import Category
from omgseg.platform.evaluation.metrics.panoptic import GtSegment, PanopticEvaluator

CATEGORIES = [Category(i, f"class{i}", True) for i in range(1, 11)]


def make_pairs(n: int, size: int, seed: int = 0):
    """Blocky ground truth (8x8 tiles of random ids) and a prediction that moves some tiles."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        tiles = rng.integers(1, 40, size=(size // 8, size // 8))
        gt = np.kron(tiles, np.ones((8, 8), dtype=np.int64))
        noisy = np.where(rng.random(tiles.shape) < 0.2, rng.integers(1, 45, size=tiles.shape), tiles)
        pred = np.kron(noisy, np.ones((8, 8), dtype=np.int64))
        gt_cat = {int(k): int(rng.integers(1, 11)) for k in np.unique(gt)}
        pred_cat = {int(k): gt_cat.get(int(k), int(rng.integers(1, 11))) for k in np.unique(pred)}
        pairs.append((gt, gt_cat, pred, pred_cat))
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    pairs = make_pairs(args.pairs, args.size)

    start = time.perf_counter()
    ours = PanopticEvaluator(CATEGORIES)
    for gt, gt_cat, pred, pred_cat in pairs:
        ids, counts = np.unique(gt, return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist()))
        ours.add(gt, {k: GtSegment(c, False, area[k]) for k, c in gt_cat.items()}, pred, pred_cat)
    ours_pq = ours.compute()["PQ"]
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    theirs = PanopticQuality(things={c.id for c in CATEGORIES}, stuffs={99})
    for gt, gt_cat, pred, pred_cat in pairs:
        def encode(ids, cats):
            lookup = np.zeros(int(ids.max()) + 1, dtype=np.int64)
            for k, c in cats.items():
                lookup[k] = c
            return torch.from_numpy(np.stack([lookup[ids], ids], axis=-1))[None]

        theirs.update(encode(pred, pred_cat), encode(gt, gt_cat))
    theirs_pq = 100 * float(theirs.compute())
    theirs_s = time.perf_counter() - start

    if abs(ours_pq - theirs_pq) > 1e-4:
        raise AssertionError(f"PQ differs: ours {ours_pq}, torchmetrics {theirs_pq}")
    print(json.dumps({
        "benchmark": "bench_metrics", "pairs": args.pairs, "size": args.size,
        "pq_ours": round(ours_pq, 6), "pq_torchmetrics": round(theirs_pq, 6),
        "ours_s": round(ours_s, 3), "torchmetrics_s": round(theirs_s, 3),
        "time_ratio_ours_over_torchmetrics": round(ours_s / theirs_s, 3),
    }))


if __name__ == "__main__":
    main()
