"""TAG look-ahead affinity against an independent computation: a copy of the model stepped by
torch.optim.SGD, and the running average across workers."""

import copy

import pytest
import torch

from omgseg.datasets.clip import Category
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.model.structures import MatchTargets, PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.affinity import AffinityAverage, lookahead_affinity
from omgseg.platform.batches import TrainBatch

H, W = 64, 64


def _batch(seed: int, label: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(1, 1, H, W, dtype=torch.bool)
    top, left = int(torch.randint(0, 30, (), generator=g)), int(torch.randint(0, 30, (), generator=g))
    masks[0, 0, top:top + 30, left:left + 30] = True
    targets = MatchTargets(labels=torch.tensor([label]), masks=masks, track_ids=torch.tensor([1]))
    return TrainBatch(images=torch.randint(0, 256, (1, 1, 3, H, W), dtype=torch.uint8, generator=g), targets=[targets],
                      prompts=[PromptBatch(torch.zeros(0, 4), (), (H, W))], datasets=("x",))


def _loss(model, vocabulary, batch, seed):
    torch.manual_seed(seed)
    return float(sum(model.loss(model(batch.images, vocabulary, batch.prompts), batch.targets).values()))


def test_affinity_equals_an_sgd_step_on_a_copy_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny")).train()
    vocabulary = Vocabulary.from_categories([Category(1, "square", True), Category(2, "disc", True)])
    batches = {"a": _batch(1, 0), "b": _batch(2, 1)}
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    lr, seed = 1e-4, 7  # an SGD step this size lowers the losses; 1e-3 already overshoots on raw gradients
    z = lookahead_affinity(model, vocabulary, batches, lr, seed=seed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert torch.equal(z, lookahead_affinity(model, vocabulary, batches, lr, seed=seed))  # deterministic

    names = list(batches)
    for i, source in enumerate(names):
        stepped = copy.deepcopy(model)
        optimizer = torch.optim.SGD([p for p in stepped.parameters() if p.requires_grad], lr=lr)
        torch.manual_seed(seed * 1000 + i)
        out = stepped(batches[source].images, vocabulary, batches[source].prompts)
        sum(stepped.loss(out, batches[source].targets).values()).backward()
        optimizer.step()
        for j, target in enumerate(names):
            base = _loss(model, vocabulary, batches[target], seed * 1000 + j)
            after = _loss(stepped, vocabulary, batches[target], seed * 1000 + j)
            assert float(z[i, j]) == pytest.approx(1 - after / base, rel=1e-4, abs=1e-6)
    assert float(z[0, 0]) > 0 and float(z[1, 1]) > 0  # a step on a batch lowers that batch's loss
    with pytest.raises(ValueError, match="look-ahead lr must be > 0"):
        lookahead_affinity(model, vocabulary, batches, 0.0, seed=0)


def test_average_state_round_trip():
    average = AffinityAverage(["a", "b"])
    average.add(torch.tensor([[0.2, -0.1], [0.0, 0.4]], dtype=torch.float64))
    average.add(torch.tensor([[0.4, 0.1], [0.2, 0.0]], dtype=torch.float64))
    again = AffinityAverage.from_state(average.state())
    means = again.means()
    assert means["a"] == pytest.approx({"a": 0.3, "b": 0.0}) and means["b"] == pytest.approx({"a": 0.1, "b": 0.2})
    assert AffinityAverage(["a"]).means() == {}
    other = AffinityAverage(["a", "b"])
    other.add(torch.tensor([[0.9, 0.0], [0.0, 0.0]], dtype=torch.float64))
    merged = again.merge(other)  # two workers: 3 probes in all
    assert merged.probes == 3 and merged.means()["a"]["a"] == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    with pytest.raises(ValueError, match=r"cannot merge affinities of \['b'\]"):
        merged.merge(AffinityAverage(["b"]))
