"""Benchmark: what each change to the TAG estimate does to its agreement with the exhaustive
influence, over several training trajectories, what a probe costs before and after, and how
the noise of one probe falls as its batch grows.

Takes a finished study (its influence table is the exhaustive side) and trains that study's
probing trial again in this process, for each of `--seeds`. At every step any variant probes,
every variant that probes there is measured on the same weights and the same source samples
(probing leaves training untouched, so one trajectory serves them all). The variants, each
the one before plus one change:

    first        SGD step of 1e-4 on the raw gradient, Z not divided by lr, L_j on j's own
                 probe batch (in-sample), 2 clips a source, a probe every 20 steps
    adam         + the optimizer's own step (AdamW from its moments, at the current lr)
    per_lr       + Z divided by the learning rate
    heldout      + L_j on a fixed held-out batch of 8 val clips of j, with j's vocabulary
    batch        + 4 clips a source
    momentum     + the reference is the step without the source's gradient (the study's
                 look-ahead since then)
    more_probes  + a probe every 12 steps instead of 20
    heldout16    + 16 held-out clips a target, 8 clips a forward pass, the held-out batches'
                 frozen CLIP maps computed once (planted.yaml's probe)

Each variant's mean Z over its probes is ranked against the pair influence (Spearman over the
ordered pairs), per seed. A probe's Z varies mostly with the state it is taken at, so one
trajectory's Spearman is itself a noisy number: the mean and the minimum over seeds are what
to compare. The cost: one probe of the last design (every forward through the frozen tower,
2 clips a forward, 8 held-out clips) and of planted.yaml's (the held-out batches' frozen maps
computed once, 8 clips a forward, 16 held-out clips), timed on the same weights, in this run.
The noise: at the first probe steps of the first seed, each source's probe batch is drawn
several times at each size, and the spread of Z over draws is set against its mean.

The trials train with the study's thread count (train.resources.cpus_per_worker): float
rounding differs with the number of threads, so another count trains another trajectory.
Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_affinity.py --study outputs/studies/planted [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from omgseg.core.seeds import derive_seed
from omgseg.platform.config import StudyConfig
from omgseg.platform.evaluation.evaluate import validation_examples
from omgseg.platform.records import StudyState
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.estimates import agreement, pair_influence
from omgseg.platform.study.plan import plan_trials, targets, trial_config
from omgseg.platform.training.affinity import HeldOut, Lookahead, in_batches, lookahead_affinity
from omgseg.platform.training.loop import build_parts, train_loop, train_stream


@dataclass(frozen=True)
class Variant:
    lookahead: Lookahead
    heldout: int | None  # held-out val clips a target; None: in-sample (j's own probe batch)
    clips: int  # clips a source
    every: int  # steps between probes
    forward: int | None = None  # clips a forward pass, held-out maps cached; None: the training batch, not cached


VARIANTS = {
    "first": Variant(Lookahead(step="sgd", baseline="weights", per_lr=False), None, 2, 20),
    "adam": Variant(Lookahead(step="optimizer", baseline="weights", per_lr=False), None, 2, 20),
    "per_lr": Variant(Lookahead(step="optimizer", baseline="weights", per_lr=True), None, 2, 20),
    "heldout": Variant(Lookahead(step="optimizer", baseline="weights", per_lr=True), 8, 2, 20),
    "batch": Variant(Lookahead(step="optimizer", baseline="weights", per_lr=True), 8, 4, 20),
    "momentum": Variant(Lookahead(), 8, 4, 20),
    "more_probes": Variant(Lookahead(), 8, 4, 12),
    "heldout16": Variant(Lookahead(), 16, 4, 12, forward=8),
}


class Variants:
    """A training hook: at every step some variant probes, Z of each variant that does."""

    def __init__(self, parts, draws: int, noise_probes: int, sizes: list[int]) -> None:
        """sizes: clips a source for the noise measurement (none: no noise measurement)."""
        self.names = list(parts.batches.counts)
        config = parts.config
        self.examples = {}
        self.vocabularies = {}
        most = max(v.heldout or 0 for v in VARIANTS.values())
        for name in self.names:
            tasks = config.data.datasets[name].supervised_tasks()
            self.vocabularies[name], self.examples[name] = validation_examples(
                config.data.shard_dir(name, "val"), name, tasks, config.batch, most)
        self.heldout: dict[tuple[int, int | None], dict[str, HeldOut]] = {}  # by (clips, forward)
        for v in VARIANTS.values():
            if v.heldout is not None and (v.heldout, v.forward) not in self.heldout:
                self.heldout[(v.heldout, v.forward)] = {n: self._heldout(parts, n, v.heldout, v.forward)
                                                        for n in self.names}
        self.sums = {name: None for name in VARIANTS}
        self.counts = dict.fromkeys(VARIANTS, 0)
        self.draws, self.noise_probes, self.sizes = draws, noise_probes, sizes
        self.noise: dict[int, list[float]] = {b: [] for b in sizes}
        self.seconds: dict[str, list[float]] = {"last": [], "new": []}

    def _heldout(self, parts, name: str, clips: int, forward: int | None) -> HeldOut:
        examples, vocabulary = self.examples[name][:clips], self.vocabularies[name]
        if forward is None:
            return HeldOut(in_batches(examples, parts.config.batch.batch_size), vocabulary)
        return HeldOut.cached(parts.model, in_batches(examples, forward), vocabulary)

    def _draw(self, parts, name: str, n: int, salt: int) -> list:
        stream = iter(train_stream(parts.config, name, derive_seed(parts.config.seed, "bench-probe", name, salt)))
        return [parts.batches.maker(name, next(stream), derive_seed(salt, name, k)) for k in range(n)]

    def _z(self, parts, probes, heldout, lookahead) -> torch.Tensor:
        return lookahead_affinity(parts.model, parts.optimizer, parts.vocabulary, probes, heldout,
                                  grad_clip=parts.config.optimizer.grad_clip, lookahead=lookahead)

    def __call__(self, parts, state, batch, losses) -> None:
        due = [name for name, v in VARIANTS.items() if state.step % v.every == 0]
        if not due:
            return
        most = max(v.clips for v in VARIANTS.values())  # every variant probes with the first clips of one draw
        drawn = {n: self._draw(parts, n, most, state.step) for n in self.names}
        for name in due:
            v = VARIANTS[name]
            probes = {n: in_batches(drawn[n][: v.clips], v.forward or parts.config.batch.batch_size) for n in self.names}
            if v.heldout is None:
                heldout = {n: HeldOut(probes[n], parts.vocabulary) for n in self.names}
            else:
                heldout = self.heldout[(v.heldout, v.forward)]
            z = self._z(parts, probes, heldout, v.lookahead)
            self.sums[name] = z if self.sums[name] is None else self.sums[name] + z
            self.counts[name] += 1
        if self.counts["heldout16"] <= self.noise_probes and "heldout16" in due:
            self._cost_and_noise(parts, drawn, state.step)

    def _cost_and_noise(self, parts, drawn, step: int) -> None:
        before, after = VARIANTS["more_probes"], VARIANTS["heldout16"]
        last = ({n: in_batches(drawn[n], parts.config.batch.batch_size) for n in self.names},
                self.heldout[(before.heldout, before.forward)])
        new = ({n: in_batches(drawn[n], after.forward) for n in self.names}, self.heldout[(after.heldout, after.forward)])
        for key, (probes, heldout) in (("last", last), ("new", new)):
            started = time.perf_counter()
            self._z(parts, probes, heldout, Lookahead())
            self.seconds[key].append(time.perf_counter() - started)
        for b in self.sizes:  # the spread over draws of the new probe, by clips a source
            zs = [self._z(parts, {n: in_batches(self._draw(parts, n, b, 1000 * step + d), after.forward) for n in self.names},
                          new[1], Lookahead()) for d in range(self.draws)]
            stack = torch.stack(zs)
            signal = stack.mean(0).abs().mean().item()
            self.noise[b].append(stack.std(0).mean().item() / signal if signal else float("nan"))

    def means(self) -> dict[str, dict[tuple[str, str], float]]:
        return {v: {(s, t): float(m[i, j]) / self.counts[v] for i, s in enumerate(self.names)
                    for j, t in enumerate(self.names) if s != t} for v, m in self.sums.items() if m is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="a finished study's folder (its influence is the exhaustive side)")
    parser.add_argument("--seeds", default="0,1,2", help="the probing trial is trained again at each of these seeds")
    parser.add_argument("--draws", type=int, default=4, help="probe batches drawn per size for the noise measurement")
    parser.add_argument("--noise-probes", type=int, default=2,
                        help="probe steps (per seed) at which cost and noise are measured (0: neither)")
    parser.add_argument("--sizes", default="2,4,8,16", help="clips a source for the noise measurement")
    args = parser.parse_args()
    folder = Path(args.study)
    config = StudyConfig.model_validate(StudyState.read(folder).config)
    metrics = pl.read_parquet(folder / "metrics.parquet")
    exhaustive = pair_influence(metrics, targets(config), StudyDesign.from_config(config))
    init = next((folder / "pretrain" / "pretrain").glob("*/model.pt"), None) if config.pretrain else None
    torch.set_num_threads(max(1, int(config.train.resources.cpus_per_worker)))  # the study's trajectories
    spearman: dict[str, list[float]] = {v: [] for v in VARIANTS}
    seconds: dict[str, list[float]] = {"last": [], "new": []}
    noise: dict[int, list[float]] = {}
    probes = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        trial = next(t for t in plan_trials(config) if len(t.datasets) == len(config.trained()) and t.seed == seed)
        train = trial_config(config, trial, folder / "bench", "sqlite:///unused.db", init)
        parts, worker = build_parts(train, 0, 1, torch.device("cpu"))
        sizes = [int(s) for s in args.sizes.split(",")] if not probes else []  # noise: the first seed's trajectory
        hook = Variants(parts, args.draws, args.noise_probes, sizes)
        train_loop(parts, worker, [hook])
        for variant, cheap in hook.means().items():
            spearman[variant].append(agreement(cheap, exhaustive)["spearman"])
        for key in seconds:
            seconds[key] += hook.seconds[key]
        for b, values in hook.noise.items():
            noise.setdefault(b, []).extend(values)
        probes = hook.counts
        print(f"bench_affinity: seed {seed}: " + ", ".join(f"{v} {r[-1]:.2f}" for v, r in spearman.items()),
              file=sys.stderr)
    cost = None  # none when --noise-probes 0
    if seconds["last"]:
        last, new = statistics.mean(seconds["last"]), statistics.mean(seconds["new"])
        cost = {"last_design": round(last, 2), "new_design": round(new, 2), "ratio": round(new / last, 2)}
    print(json.dumps({
        "benchmark": "bench_affinity", "study": config.name, "seeds": args.seeds, "pairs": len(exhaustive),
        "probes_per_trial": probes,
        "spearman_per_seed": {v: [round(r, 3) for r in rs] for v, rs in spearman.items()},
        "spearman_mean": {v: round(statistics.mean(rs), 3) for v, rs in spearman.items()},
        "spearman_min": {v: round(min(rs), 3) for v, rs in spearman.items()},
        "probe_seconds": cost,
        "noise_spread_over_mean_by_clips": {b: round(statistics.mean(v), 3) for b, v in noise.items() if v},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
