"""Inter-task affinity measured inside one co-training run (TAG: Fifty et al., "Efficiently
Identifying Task Groupings", NeurIPS 2021).

The look-ahead affinity of data set i on data set j at a step is

    Z_ij = (1 - L_j(theta'_i) / L_j(theta'_0)) / lr,   theta'_i = the optimizer's step on i's batch,
                                                       theta'_0 = its step with no new gradient

over the shared parameters (in OMG-Seg every trainable parameter is shared by every task:
there are no task heads). As the paper does it:
- theta'_i is the step the optimizer itself would take: AdamW's preconditioned update from its
  current moments, at the current learning rate, after the training step's gradient clipping
  (a raw SGD step at a fixed rate measures another optimizer's geometry);
- Z is divided by the learning rate, so probes early and late in a schedule are comparable;
- the reference is the optimizer's own step without the source's gradient (its momentum), not
  theta itself as the paper writes it: from theta, the momentum's effect on each target, the
  same for every source, shifts whole columns of Z with the trajectory (`Lookahead`);
- L_j is the loss on a fixed held-out batch of j (its validation split, with j's own
  vocabulary), the same at every probe, so Z_jj is not measured on the batch it stepped on.
Z_ij > 0: a step on i's data lowers j's loss (i helps j). Averaged over the run, it is the
cheap estimate that a study sets beside the exhaustive pair influence.

Probing leaves training untouched: weights and optimizer state are copied back exactly, no
gradient buffer is left behind, and every random draw comes from the probe's own samples.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from omgseg.core.seeds import derive_seed
from omgseg.datasets.stream import decode_sample
from omgseg.model.backbone import TowerMaps
from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.evaluate import validation_examples
from omgseg.platform.training.batches import TrainBatch, TrainExample, collate
from omgseg.platform.training.loop import TrainParts, WorkerState, train_stream


@dataclass(frozen=True)
class HeldOut:
    """A data set's fixed held-out batches and the vocabulary its loss is measured with.
    `towers`: each batch's frozen CLIP maps (`OMGSeg.tower`), computed once: every look-ahead
    of every probe runs these same images, and the frozen tower was about a third of that time.

    Batches and maps stay where they were made; `mean_loss` moves one batch at a time to the
    model's device. Kept on the host, the device holds one batch's inputs and maps at a time
    whatever the number of data sets: with (1 + n) look-aheads over n targets, maps of every
    target on the device grow with n (an estimated 12-23 GB at n = 4 for the paper model)."""

    batches: Sequence[TrainBatch]
    vocabulary: Vocabulary
    towers: Sequence[TowerMaps] | None = None

    @classmethod
    def cached(cls, model: OMGSeg, batches: Sequence[TrainBatch], vocabulary: Vocabulary, *,
               autocast: bool = False, keep: str = "device") -> HeldOut:
        """`keep`: "device" (batches and maps on the model's device: no copy per look-ahead),
        "host" (both in host memory, pinned on CUDA so the copies overlap compute) or
        "recompute" (no maps kept: the tower runs again at every look-ahead)."""
        if keep not in HELDOUT_KEEP:
            raise ValueError(f"affinity.heldout_maps must be one of {HELDOUT_KEEP}, got {keep!r}")
        if keep == "recompute":
            return cls(list(batches), vocabulary)
        device = next(model.parameters()).device
        home = device if keep == "device" else torch.device("cpu")
        pin = keep == "host" and device.type == "cuda"
        kept, towers = [], []
        for batch in batches:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                maps = model.tower(batch.images.to(device))
            kept.append(_pinned(batch.to(home)) if pin else batch.to(home))
            towers.append(_maps_to(maps, home, pin))
        return cls(kept, vocabulary, towers)


HELDOUT_KEEP = ("device", "host", "recompute")


def _maps_to(maps: TowerMaps, device: torch.device, pin: bool = False) -> TowerMaps:
    def move(t: Tensor) -> Tensor:
        t = t.to(device, non_blocking=True)
        return t.pin_memory() if pin else t

    return TowerMaps(stages=tuple(move(t) for t in maps.stages), dense=move(maps.dense))


def _pinned(batch: TrainBatch) -> TrainBatch:
    """Pinned host memory for the images, the bulk of a batch's bytes."""
    return dataclasses.replace(batch, images=batch.images.pin_memory())


def held_out_bytes(heldout: HeldOut) -> int:
    """Bytes of the held-out images and maps: what sits on the device when kept there."""
    maps = [t for m in heldout.towers or () for t in (*m.stages, m.dense)]
    return sum(t.numel() * t.element_size() for t in [*maps, *(b.images for b in heldout.batches)])


def in_batches(examples: Sequence[TrainExample], size: int) -> list[TrainBatch]:
    """`examples` collated `size` clips at a time: one forward pass each."""
    return [collate(list(examples[k:k + size])) for k in range(0, len(examples), size)]


def final_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The loss of the last prediction set (what inference uses): every term but the earlier
    sets' (`_aux`) and the zero anchor."""
    return sum(v for k, v in losses.items() if "_aux" not in k and k != "loss_zero_anchor")


def mean_loss(model: OMGSeg, vocabulary: Vocabulary, batches: Sequence[TrainBatch], *, final: bool,
              autocast: bool = False, towers: Sequence[TowerMaps] | None = None) -> Tensor:
    """The mean over `batches` of the training loss (all prediction sets) or of `final_loss`;
    `towers`: the batches' frozen CLIP maps, if computed before."""
    device = next(model.parameters()).device
    total = 0.0
    for k, batch in enumerate(batches):
        batch = batch.to(device)  # held-out batches may live on the host
        tower = None if towers is None else _maps_to(towers[k], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            # No collective: every rank probes on its own batches, for its own estimate.
            outputs = model(batch.images, vocabulary, batch.prompts, tower=tower)
            losses = model.loss(outputs, batch.targets, across_workers=False, final_only=final)
        total = total + (final_loss(losses) if final else sum(losses.values()))
    return total / len(batches)


class _Snapshot:
    """Exact copies of the trainable weights and of the optimizer's state for them."""

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.optimizer = optimizer
        self.weights = [p.detach().clone() for p in params]
        self.state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
                      for p in params if p in optimizer.state}

    @torch.no_grad()
    def restore(self) -> None:
        for p, w in zip(self.params, self.weights):
            p.copy_(w)
            p.grad = None
        for p in self.params:
            saved = self.state.get(p)
            if saved is None:
                self.optimizer.state.pop(p, None)  # the look-ahead was this parameter's first step
                continue
            for k, v in saved.items():
                current = self.optimizer.state[p][k]
                if isinstance(v, Tensor):
                    current.copy_(v)
                else:
                    self.optimizer.state[p][k] = v


@dataclass(frozen=True)
class Lookahead:
    """How a look-ahead is taken. The defaults are the study's; the others exist to measure
    what each choice changes (tests/benchmarks/bench_affinity.py).

    step: "optimizer" (the run's own optimizer.step(): AdamW from its current moments, at the
        current learning rate) or "sgd" (a raw gradient step of `sgd_lr`, the first version).
    baseline: "momentum" (the default): L_j after the optimizer's step with no new gradient
        (Adam's momentum alone), so Z is what the source's gradient adds to the step the
        optimizer takes anyway; "weights": L_j at theta, as the paper writes it. Adam's step is
        mostly momentum (beta1 = 0.9), and the momentum part moves each target by an amount that
        is the same for every source but depends on the trajectory: from the weights it shifts
        a whole column of Z, which decides the ranking across targets. Measured on the planted
        study's probing trial, on one trajectory and the same probe draws: Spearman against the
        exhaustive influence 0.25 and 0.36 from the weights, 0.76 and 0.89 from the momentum step;
        on a trajectory that differed only by float rounding (2 threads instead of 1), 0.59 to
        0.79 from the weights over 6 draws (docs/studies.md, the planted benchmark).
    per_lr: divide Z by the learning rate (by sgd_lr for "sgd").
    """

    step: str = "optimizer"
    baseline: str = "momentum"
    per_lr: bool = True
    sgd_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.step not in ("optimizer", "sgd") or self.baseline not in ("momentum", "weights"):
            raise ValueError(f"look-ahead step must be optimizer or sgd and baseline momentum or weights, got {self}")


def lookahead_affinity(model: OMGSeg, optimizer: torch.optim.Optimizer, vocabulary: Vocabulary,
                       probes: Mapping[str, Sequence[TrainBatch]], heldout: Mapping[str, HeldOut], *,
                       grad_clip: float | None = None, autocast: bool = False,
                       lookahead: Lookahead = Lookahead()) -> Tensor:
    """(n, n) Z[i, j] over the n data sets of `probes` (sources, trained with the run's
    `vocabulary`) and `heldout` (targets, in the same order and with the same names).

    Each look-ahead is taken as `lookahead` says (by default `optimizer.step()` itself on the
    source's gradient, at the learning rate its first parameter group has now); weights and
    optimizer state are restored after every one.
    """
    names = list(probes)
    if list(heldout) != names:
        raise ValueError(f"held-out batches are for {list(heldout)}, probes for {names}: they must match")
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lr = float(optimizer.param_groups[0]["lr"]) if lookahead.step == "optimizer" else lookahead.sgd_lr
    if lr <= 0:
        raise ValueError(f"the look-ahead's learning rate is {lr}: it needs lr > 0")

    def target_losses() -> list[float]:
        with torch.no_grad():
            return [float(mean_loss(model, heldout[j].vocabulary, heldout[j].batches, final=True, autocast=autocast,
                                    towers=heldout[j].towers)) for j in names]

    def look(grads: Sequence[Tensor | None] | None) -> list[float]:
        """The targets' losses after one step on `grads` (None: no new gradient)."""
        snapshot = _Snapshot(params, optimizer)
        if lookahead.step == "sgd":
            with torch.no_grad():
                for p, g in zip(params, grads or ()):
                    if g is not None:
                        p.sub_(lr * g)
        else:
            for k, p in enumerate(params):
                g = None if grads is None else grads[k]
                p.grad = torch.zeros_like(p) if g is None else g.contiguous()  # autograd may hand out expanded views
            if grad_clip is not None and grads is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        losses = target_losses()
        snapshot.restore()
        return losses

    base = look(None) if lookahead.baseline == "momentum" else target_losses()
    scale = lr if lookahead.per_lr else 1.0
    z = torch.zeros(len(names), len(names), dtype=torch.float64)
    for i, source in enumerate(names):
        grads = torch.autograd.grad(mean_loss(model, vocabulary, probes[source], final=False, autocast=autocast), params,
                                    allow_unused=True)
        after = look(grads)
        for j in range(len(names)):
            z[i, j] = (1.0 - after[j] / base[j]) / scale if base[j] > 0 else 0.0
    return z


class AffinityAverage:
    """Every probe's Z per (source, target), and their mean; mergeable across workers."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.history: list[Tensor] = []  # one (n, n) Z per probe, in order

    @property
    def probes(self) -> int:
        return len(self.history)

    def add(self, z: Tensor) -> None:
        self.history.append(z.to(torch.float64).clone())

    def merge(self, other: AffinityAverage) -> AffinityAverage:
        """Add another worker's probes (same data sets, same order)."""
        if other.names != self.names:
            raise ValueError(f"cannot merge affinities of {other.names} into {self.names}")
        self.history += other.history
        return self

    def state(self) -> dict:
        return {"names": self.names, "history": [z.tolist() for z in self.history]}

    @classmethod
    def from_state(cls, state: dict) -> AffinityAverage:
        out = cls(state["names"])
        out.history = [torch.tensor(z, dtype=torch.float64) for z in state["history"]]
        return out

    def _table(self, matrix: Tensor) -> dict[str, dict[str, float]]:
        return {s: {t: float(matrix[i, j]) for j, t in enumerate(self.names)} for i, s in enumerate(self.names)}

    def means(self, probes: slice = slice(None)) -> dict[str, dict[str, float]]:
        """{source: {target: mean Z}} over the probes (or the `probes` slice of them; {} if none)."""
        chosen = self.history[probes]
        return self._table(torch.stack(chosen).mean(0)) if chosen else {}

    def standard_errors(self) -> dict[str, dict[str, float]]:
        """{source: {target: standard error of the mean Z over probes}} (needs 2 probes)."""
        if self.probes < 2:
            return {}
        return self._table(torch.stack(self.history).std(0) / self.probes ** 0.5)


class AffinityProbe:
    """A training hook: every `affinity.every` steps, Z over the run's data sets
    (`lookahead_affinity`), from probe batches of their own streams (never the training mix)
    and fixed held-out batches of their val splits. Sums live in the worker state, so they
    survive a resume, and the probe streams continue where they were."""

    def __init__(self, parts: TrainParts, state: WorkerState) -> None:
        config = parts.config
        self.settings = config.affinity
        self.names = list(parts.batches.counts)
        self.average = AffinityAverage.from_state(state.affinity) if state.affinity else AffinityAverage(self.names)
        drawn = self.average.probes * self.settings.batch_size  # per data set, this rank
        if drawn and set(state.probe_streams) != set(self.names):
            raise ValueError("the checkpoint has probe sums but not the probe streams' positions: it was written "
                             "before streams recorded them; start the run afresh")
        self.streams = {n: train_stream(config, n, derive_seed(config.seed, "probe-stream", n, parts.rank)).raw_samples(
            parts.rank, parts.world, start=state.probe_streams.get(n)) for n in self.names}
        self.drawn = dict.fromkeys(self.names, drawn)
        self.seed, self.rank = config.seed, parts.rank
        self.forward_size = self.settings.forward_batch_size or config.batch.batch_size
        self.heldout = {}
        for name in self.names:
            tasks = config.data.datasets[name].supervised_tasks()
            vocabulary, examples = validation_examples(config.data.shard_dir(name, "val"), name, tasks, config.batch,
                                                       self.settings.heldout_samples)
            if not examples:
                raise ValueError(f"affinity: data set {name!r} has no val samples for its held-out batch")
            self.heldout[name] = HeldOut.cached(parts.model, in_batches(examples, self.forward_size), vocabulary,
                                                autocast=parts.autocast, keep=self.settings.heldout_maps)

    def _probe_batches(self, parts: TrainParts, state: WorkerState, name: str) -> list[TrainBatch]:
        examples = []
        for _ in range(self.settings.batch_size):
            key = derive_seed(self.seed, "probe-sample", name, self.rank, self.drawn[name])
            examples.append(parts.batches.maker(name, decode_sample(next(self.streams[name])), key))
            self.drawn[name] += 1
        state.probe_streams[name] = self.streams[name].position
        return [b.to(parts.device) for b in in_batches(examples, self.forward_size)]

    def __call__(self, parts: TrainParts, state: WorkerState, batch: TrainBatch, losses: dict[str, float]) -> None:
        if state.step % self.settings.every:
            return
        started = time.perf_counter()
        probes = {name: self._probe_batches(parts, state, name) for name in self.names}
        z = lookahead_affinity(parts.model, parts.optimizer, parts.vocabulary, probes, self.heldout,
                               grad_clip=parts.config.optimizer.grad_clip, autocast=parts.autocast)
        self.average.add(z)
        state.affinity = self.average.state()
        state.seconds["affinity"] += time.perf_counter() - started
