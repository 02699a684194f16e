"""TAG look-ahead affinity against an independent computation: a copy of the model stepped by
torch.optim.AdamW from the same optimizer state; the weights and optimizer state restored
exactly; and the running average across probes and workers."""

import copy

import pytest
import torch

from omgseg.core.structures import Category
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.model.structures import MatchTargets, PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.training.affinity import (
    AffinityAverage,
    HeldOut,
    Lookahead,
    final_loss,
    held_out_bytes,
    lookahead_affinity,
)
from omgseg.platform.training.batches import TrainBatch

H, W = 64, 64
CLIP = 0.5


def _batch(seed: int, label: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(1, 1, H, W, dtype=torch.bool)
    top, left = int(torch.randint(0, 30, (), generator=g)), int(torch.randint(0, 30, (), generator=g))
    masks[0, 0, top:top + 30, left:left + 30] = True
    # A seed of its own: the loss's point sampling is the same before and after a look-ahead.
    targets = MatchTargets(labels=torch.tensor([label]), masks=masks, track_ids=torch.tensor([1]), seed=100 + seed)
    return TrainBatch(images=torch.randint(0, 256, (1, 1, 3, H, W), dtype=torch.uint8, generator=g), targets=[targets],
                      prompts=[PromptBatch(torch.zeros(0, 4), (), (H, W))], datasets=("x",))


def _loss(model, vocabulary, batch, final=True):
    losses = model.loss(model(batch.images, vocabulary, batch.prompts), batch.targets)
    return final_loss(losses) if final else sum(losses.values())


def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": params[::2], "weight_decay": 0.05}, {"params": params[1::2], "weight_decay": 0.0}],
                             lr=1e-3)


def test_affinity_equals_an_adamw_step_on_a_copy_and_leaves_weights_and_moments_alone():
    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny")).train()
    vocabulary = Vocabulary.from_categories([Category(1, "square", True), Category(2, "disc", True)])
    optimizer = _optimizer(model)
    for k in range(2):  # Adam's moments are not zero any more: the look-ahead must use them
        optimizer.zero_grad()
        _loss(model, vocabulary, _batch(10 + k, k % 2), final=False).backward()
        optimizer.step()
    probes = {"a": [_batch(1, 0)], "b": [_batch(2, 1), _batch(3, 1)]}
    heldout = {"a": HeldOut([_batch(4, 0)], vocabulary), "b": HeldOut([_batch(5, 1)], vocabulary)}
    weights = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    moments = copy.deepcopy(optimizer.state_dict())
    z = lookahead_affinity(model, optimizer, vocabulary, probes, heldout, grad_clip=CLIP)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    after = optimizer.state_dict()
    assert all(torch.equal(after["state"][i][key], moments["state"][i][key])
               for i in moments["state"] for key in moments["state"][i])
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(z, lookahead_affinity(model, optimizer, vocabulary, probes, heldout, grad_clip=CLIP))
    # The held-out batches' frozen CLIP maps computed once (what the probe does) change nothing.
    # So do the other places to keep them: host memory, moved a batch at a time, or not kept.
    for keep in ("device", "host", "recompute"):
        cached = {name: HeldOut.cached(model, h.batches, h.vocabulary, keep=keep) for name, h in heldout.items()}
        assert (cached["a"].towers is None) == (keep == "recompute")
        assert torch.equal(z, lookahead_affinity(model, optimizer, vocabulary, probes, cached, grad_clip=CLIP)), keep
    assert held_out_bytes(cached["a"]) == heldout["a"].batches[0].images.numel()  # uint8 images, no maps
    with pytest.raises(ValueError, match="affinity.heldout_maps must be one of"):
        HeldOut.cached(model, heldout["a"].batches, vocabulary, keep="disk")

    lr = optimizer.param_groups[0]["lr"]

    def stepped_copy(source):
        """A copy of the model stepped by AdamW from the same moments (no new gradient: None)."""
        stepped = copy.deepcopy(model)
        step = _optimizer(stepped)
        step.load_state_dict(copy.deepcopy(moments))
        trainable = [p for p in stepped.parameters() if p.requires_grad]
        if source is None:
            for p in trainable:
                p.grad = torch.zeros_like(p)
        else:
            loss = sum(_loss(stepped, vocabulary, b, final=False) for b in probes[source]) / len(probes[source])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        step.step()
        return stepped

    def held_out_loss(m, target):
        with torch.no_grad():
            return float(_loss(m, vocabulary, heldout[target].batches[0]))

    momentum_only = stepped_copy(None)
    from_weights = lookahead_affinity(model, optimizer, vocabulary, probes, heldout, grad_clip=CLIP,
                                      lookahead=Lookahead(baseline="weights"))
    for i, source in enumerate(probes):
        stepped = stepped_copy(source)
        for j, target in enumerate(heldout):
            moved = held_out_loss(stepped, target)
            reference = held_out_loss(momentum_only, target)
            assert float(z[i, j]) == pytest.approx((1 - moved / reference) / lr, rel=1e-4, abs=1e-3)
            assert float(from_weights[i, j]) == pytest.approx((1 - moved / held_out_loss(model, target)) / lr,
                                                              rel=1e-4, abs=1e-3)
    assert float(from_weights[0, 0]) > 0 and float(from_weights[1, 1]) > 0  # a step lowers its own held-out loss
    with pytest.raises(ValueError, match="held-out batches are for"):
        lookahead_affinity(model, optimizer, vocabulary, probes, {"a": heldout["a"]})


def test_average_state_round_trip_halves_and_merge():
    average = AffinityAverage(["a", "b"])
    average.add(torch.tensor([[0.2, -0.1], [0.0, 0.4]], dtype=torch.float64))
    average.add(torch.tensor([[0.4, 0.1], [0.2, 0.0]], dtype=torch.float64))
    again = AffinityAverage.from_state(average.state())
    means = again.means()
    assert means["a"] == pytest.approx({"a": 0.3, "b": 0.0}) and means["b"] == pytest.approx({"a": 0.1, "b": 0.2})
    assert again.means(slice(0, None, 2))["a"]["b"] == pytest.approx(-0.1)  # the even probes: the first
    assert again.standard_errors()["a"]["a"] == pytest.approx(torch.tensor([0.2, 0.4]).std().item() / 2 ** 0.5)
    assert AffinityAverage(["a"]).means() == {}
    other = AffinityAverage(["a", "b"])
    other.add(torch.tensor([[0.9, 0.0], [0.0, 0.0]], dtype=torch.float64))
    merged = again.merge(other)  # two workers: 3 probes in all
    assert merged.probes == 3 and merged.means()["a"]["a"] == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    with pytest.raises(ValueError, match=r"cannot merge affinities of \['b'\]"):
        merged.merge(AffinityAverage(["b"]))
