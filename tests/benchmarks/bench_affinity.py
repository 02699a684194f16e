"""Benchmark: what each change to the TAG look-ahead does to its agreement with the exhaustive
influence, and how its noise falls as the probe batch grows.

Takes a finished study (its influence table is the exhaustive side), trains that study's
probing trial again in this process, and at every probe step measures several look-ahead
variants on the same weights and the same samples (probing leaves training untouched, so one
trajectory serves them all):

    first      the first version: SGD step of 1e-4 on the raw gradient, Z not divided by lr,
               L_j on j's own probe batch (in-sample), 2 clips a source
    adam       + the optimizer's own step (AdamW from its moments, at the current lr)
    per_lr     + Z divided by the learning rate
    heldout    + L_j on a fixed held-out val batch of j, with j's vocabulary
    batch      + the configured probe batch (affinity.batch_size clips): the paper's look-ahead
    momentum   + the reference is the step without the source's gradient: the study's look-ahead

The trial is trained with the study's thread count (train.resources.cpus_per_worker): float
rounding differs with the number of threads, so another count trains another trajectory, and
the look-ahead from the weights depends on the trajectory (platform/affinity.py, `Lookahead`).

Each variant's mean Z over probes is ranked against the pair influence (Spearman over the
ordered pairs). Then, at a few probe steps, each source's probe batch is drawn several times
at each size, and the spread of Z over draws is set against its mean. Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_affinity.py --study outputs/studies/planted [--draws 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import polars as pl
import torch

from omgseg.core.seeds import derive_seed
from omgseg.platform.affinity import AffinityProbe, HeldOut, Lookahead, lookahead_affinity
from omgseg.platform.batches import collate
from omgseg.platform.config import StudyConfig
from omgseg.platform.estimates import agreement, pair_influence
from omgseg.platform.loop import build_parts, train_loop, train_stream
from omgseg.platform.plan import plan_trials, targets, trial_config
from omgseg.platform.records import StudyState

VARIANTS = {  # name: (look-ahead, held-out batch, clips a source: None = the configured size)
    "first": (Lookahead(step="sgd", baseline="weights", per_lr=False), False, 2),
    "adam": (Lookahead(step="optimizer", baseline="weights", per_lr=False), False, 2),
    "per_lr": (Lookahead(step="optimizer", baseline="weights", per_lr=True), False, 2),
    "heldout": (Lookahead(step="optimizer", baseline="weights", per_lr=True), True, 2),
    "batch": (Lookahead(step="optimizer", baseline="weights", per_lr=True), True, None),
    "momentum": (Lookahead(), True, None),
}


class Variants:
    """A training hook: at every probe step, Z of every variant on the same samples."""

    def __init__(self, parts, state, draws: int, noise_probes: int, sizes: list[int]) -> None:
        self.probe = AffinityProbe(parts, state)  # its streams, held-out batches and settings
        self.sums = {name: None for name in VARIANTS}
        self.count = 0
        self.draws, self.noise_probes, self.sizes = draws, noise_probes, sizes
        self.noise: dict[int, list[float]] = {b: [] for b in sizes}

    def _draw(self, parts, name: str, n: int, salt: int) -> list:
        stream = iter(train_stream(parts.config, name, derive_seed(parts.config.seed, "bench-probe", name, salt)))
        examples = [parts.batches.maker(name, next(stream), derive_seed(salt, name, k)) for k in range(n)]
        size = parts.config.batch.batch_size
        return [collate(examples[k:k + size]) for k in range(0, n, size)]

    def __call__(self, parts, state, batch, losses) -> None:
        settings = parts.config.affinity
        if state.step % settings.every:
            return
        names = self.probe.names
        most = max(settings.batch_size, 2)
        drawn = {n: self._draw(parts, n, most, state.step) for n in names}
        for variant, (lookahead, held, size) in VARIANTS.items():
            clips = size or settings.batch_size
            probes = {n: _first(drawn[n], clips, parts.config.batch.batch_size) for n in names}
            heldout = self.probe.heldout if held else {n: HeldOut(probes[n], parts.vocabulary) for n in names}
            z = lookahead_affinity(parts.model, parts.optimizer, parts.vocabulary, probes, heldout,
                                   grad_clip=parts.config.optimizer.grad_clip, lookahead=lookahead)
            self.sums[variant] = z if self.sums[variant] is None else self.sums[variant] + z
        self.count += 1
        if self.count <= self.noise_probes:  # the spread over draws of the study's look-ahead, by batch size
            for b in self.sizes:
                zs = [lookahead_affinity(parts.model, parts.optimizer, parts.vocabulary,
                                         {n: self._draw(parts, n, b, 1000 * state.step + d) for n in names},
                                         self.probe.heldout, grad_clip=parts.config.optimizer.grad_clip)
                      for d in range(self.draws)]
                stack = torch.stack(zs)
                spread = stack.std(0).mean().item()
                signal = stack.mean(0).abs().mean().item()
                self.noise[b].append(spread / signal if signal else float("nan"))

    def means(self) -> dict[str, dict[tuple[str, str], float]]:
        names = self.probe.names
        return {v: {(s, t): float(m[i, j]) / self.count for i, s in enumerate(names) for j, t in enumerate(names)
                    if s != t} for v, m in self.sums.items()}


def _first(batches: list, clips: int, size: int) -> list:
    """The first `clips` clips of `batches` (each of `size` clips)."""
    return batches[: max(1, clips // size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="a finished study's folder (its influence is the exhaustive side)")
    parser.add_argument("--draws", type=int, default=4, help="probe batches drawn per size for the noise measurement")
    parser.add_argument("--noise-probes", type=int, default=2, help="probe steps at which the noise is measured")
    parser.add_argument("--sizes", default="2,4,8,16", help="probe batch sizes (clips a source) for the noise measurement")
    args = parser.parse_args()
    folder = Path(args.study)
    state = StudyState.read(folder)
    config = StudyConfig.model_validate(state.config)
    trial = next(t for t in plan_trials(config) if t.measures_affinity)
    init = next((folder / "pretrain" / "pretrain").glob("*/model.pt"), None) if config.pretrain else None
    train = trial_config(config, trial, folder / "bench", "sqlite:///unused.db", init)
    torch.set_num_threads(max(1, int(config.train.resources.cpus_per_worker)))  # the study's trajectory
    parts, worker = build_parts(train, 0, 1, torch.device("cpu"))
    hook = Variants(parts, worker, args.draws, args.noise_probes, [int(s) for s in args.sizes.split(",")])
    train_loop(parts, worker, [hook])
    metrics = pl.read_parquet(folder / "metrics.parquet")
    exhaustive = pair_influence(metrics, targets(config), config.trained())
    out = {"benchmark": "bench_affinity", "study": config.name, "trial": trial.trial_id, "probes": hook.count,
           "pairs": len(exhaustive)}
    for variant, cheap in hook.means().items():
        found = agreement(cheap, exhaustive)
        out[f"spearman_{variant}"] = None if found["spearman"] is None else round(found["spearman"], 3)
        out[f"permutation_p_{variant}"] = found["permutation_p"]
    out["noise_spread_over_mean_by_batch"] = {b: round(statistics.mean(v), 3) for b, v in hook.noise.items() if v}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
