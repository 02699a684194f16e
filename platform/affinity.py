"""Inter-task affinity measured inside one co-training run (TAG: Fifty et al., "Efficiently
Identifying Task Groupings", NeurIPS 2021).

The look-ahead affinity of data set i on data set j at a step is

    Z_ij = 1 - L_j(theta - lr * grad L_i(theta)) / L_j(theta)

over the shared parameters (in OMG-Seg every trainable parameter is shared by every task:
there are no task heads). Z_ij > 0: a step on i's data lowers j's loss (i helps j). Averaged
over the run, it is the cheap estimate that a study sets beside the exhaustive pair influence.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from omgseg.model.omgseg import OMGSeg
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.batches import TrainBatch


@torch.no_grad()
def _restore(params: list[Tensor], saved: list[Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)


def lookahead_affinity(model: OMGSeg, vocabulary: Vocabulary, batches: Mapping[str, TrainBatch], lr: float,
                       seed: int, autocast: bool = False) -> Tensor:
    """(n, n) Z[i, j] for the n data sets of `batches` (one batch each, in their order).

    The model's weights are the same after the call as before (a copy is restored, not a
    subtraction undone). Every L_j is computed with the same seed for the criterion's random
    point sampling before and after the look-ahead, so Z measures the step, not the sampling.
    """
    if lr <= 0:
        raise ValueError(f"look-ahead lr must be > 0, got {lr}")
    names = list(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    device = params[0].device
    devices = [device] if device.type == "cuda" else []

    def loss(name: str, k: int) -> Tensor:
        batch = batches[name]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1000 + k)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                outputs = model(batch.images, vocabulary, batch.prompts)
                return sum(model.loss(outputs, batch.targets).values())

    with torch.no_grad():
        base = [float(loss(name, j)) for j, name in enumerate(names)]
    z = torch.zeros(len(names), len(names), dtype=torch.float64)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(loss(name, i), params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
            for j, target in enumerate(names):
                z[i, j] = 1.0 - float(loss(target, j)) / base[j] if base[j] > 0 else 0.0
        _restore(params, saved)
    return z


class AffinityAverage:
    """Running sums of Z over probes, per (source, target); summable across workers."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.sums = torch.zeros(len(names), len(names), dtype=torch.float64)
        self.probes = 0

    def add(self, z: Tensor) -> None:
        self.sums += z
        self.probes += 1

    def merge(self, other: AffinityAverage) -> AffinityAverage:
        """Add another worker's sums (same data sets, same order)."""
        if other.names != self.names:
            raise ValueError(f"cannot merge affinities of {other.names} into {self.names}")
        self.sums += other.sums
        self.probes += other.probes
        return self

    def state(self) -> dict:
        return {"names": self.names, "sums": self.sums.tolist(), "probes": self.probes}

    @classmethod
    def from_state(cls, state: dict) -> AffinityAverage:
        out = cls(state["names"])
        out.sums = torch.tensor(state["sums"], dtype=torch.float64)
        out.probes = int(state["probes"])
        return out

    def means(self) -> dict[str, dict[str, float]]:
        """{source: {target: mean Z}} over the probes so far ({} before the first)."""
        if self.probes == 0:
            return {}
        return {s: {t: float(self.sums[i, j]) / self.probes for j, t in enumerate(self.names)}
                for i, s in enumerate(self.names)}
