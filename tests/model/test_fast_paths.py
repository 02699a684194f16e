"""The GPU fast paths, checked on CPU: a training step that never makes the host wait for the
device, bfloat16 autocast with float32 where it matters (model/precision.py), and
torch.compile.

"Never waits" is checked on the meta device, where tensors have shapes but no values: every
read of a value (`.item()`, `bool()`, a copy to the host) and every blocking copy from the
host is recorded by a dispatch mode, which answers the copies to the host with zeros.
"""

import dataclasses

import pytest
import torch
from golden_model import golden_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from omgseg.model.config import tiny
from omgseg.model.omgseg import OMGSeg


class DeviceWaits(TorchDispatchMode):
    """Records what would make the host wait for a device: value reads of device tensors,
    copies to the host (answered with zeros), blocking copies from the host; and every
    operator's name, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[str] = []
        self.to_host = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.waits.append(f"a value read from the device ({tuple(args[0].shape)})")
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], torch.device(kwargs.get("device") or args[0].device)
            if src.device.type == "meta" and dst.type == "cpu":
                self.to_host += 1
                self.ops.append("to host")
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            if src.device.type == "cpu" and dst.type == "meta" and not kwargs.get("non_blocking", False):
                self.waits.append(f"a blocking copy to the device ({tuple(src.shape)})")
        return func(*args, **kwargs)


def _on(device: str, obj):
    """A copy of a PromptBatch or MatchTargets with its tensors on `device` (no generator:
    the meta device has none, so the clips draw from the global one)."""
    moved = {f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
             if isinstance(getattr(obj, f.name), torch.Tensor)}
    if hasattr(obj, "seed"):
        moved["seed"] = None
    return dataclasses.replace(obj, **moved)


@pytest.fixture(scope="module")
def meta_model_and_batch():
    torch.manual_seed(0)
    model = OMGSeg(tiny())
    images, vocabulary, prompts, targets = golden_inputs()
    model.text_embeddings(vocabulary)  # cached, as after the first step
    model.to("meta")
    model.text._cache = type(model.text._cache)({k: v.to("meta") for k, v in model.text._cache.items()})
    batch = (images.to("meta"), vocabulary, [_on("meta", p) for p in prompts], [_on("meta", t) for t in targets])
    return model.train(), batch


def test_forward_loss_and_backward_read_from_the_device_once(meta_model_and_batch):
    """The only read is the matcher's one copy of every prediction set's costs to the host,
    where the Hungarian algorithm runs."""
    model, (images, vocabulary, prompts, targets) = meta_model_and_batch
    with DeviceWaits() as watch:
        losses = model.loss(model(images, vocabulary, prompts), targets, check_finite=False)
        sum(losses.values()).backward()
    assert watch.waits == []
    assert watch.to_host == 1
    assert len(losses) == 7 * 5 + 1  # seven prediction sets of five terms, and the zero anchor


def test_train_step_reads_the_losses_once_after_the_update(meta_model_and_batch):
    from types import SimpleNamespace

    from omgseg.platform.training.batches import TrainBatch
    from omgseg.platform.training.loop import TrainParts, train_step

    model, (images, vocabulary, prompts, targets) = meta_model_and_batch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    parts = TrainParts(
        config=SimpleNamespace(optimizer=SimpleNamespace(grad_clip=0.01, amp=True)), model=model, forward=model,
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        vocabulary=vocabulary, batches=None, device=torch.device("meta"))
    batch = TrainBatch(images=images, targets=targets, prompts=prompts, datasets=("coco", "coco"))
    with DeviceWaits() as watch:
        terms = train_step(parts, batch)
    assert watch.waits == []
    assert watch.to_host == 2  # the matching costs, then the loss terms
    last_update = max(i for i, op in enumerate(watch.ops) if "addcdiv" in op or "_fused_adamw" in op)  # AdamW's update
    last_read = max(i for i, op in enumerate(watch.ops) if op == "to host")
    assert last_read > last_update
    assert len(terms) == 7 * 5 + 1 and all(isinstance(v, float) for v in terms.values())


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    return OMGSeg(tiny()).train(), golden_inputs()


def test_bfloat16_autocast_keeps_losses_class_logits_and_locations_in_float32(model_and_batch, monkeypatch):
    import omgseg.model.pixel_decoder as pixel_decoder

    model, (images, vocabulary, prompts, targets) = model_and_batch
    reference = model.loss(model(images, vocabulary, prompts), targets)
    location_dtypes = set()
    sample = pixel_decoder.sample_pixels

    def spy(value, shapes, pixels, weights):
        location_dtypes.add(pixels.dtype)
        return sample(value, shapes, pixels, weights)

    monkeypatch.setattr(pixel_decoder, "sample_pixels", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, vocabulary, prompts)
        losses = model.loss(outputs, targets)
    assert outputs.queries.mask_logits.dtype == torch.bfloat16  # the bulk ran in bfloat16
    assert outputs.queries.class_logits.dtype == torch.float32
    assert location_dtypes == {torch.float32}
    assert {v.dtype for v in losses.values()} == {torch.float32}
    total, want = sum(losses.values()), sum(reference.values())
    assert abs(float(total.detach()) - float(want.detach())) < 0.05 * float(want.detach())
    model.zero_grad()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compiled_parts_give_the_same_outputs_and_gradients(model_and_batch):
    """torch.compile through dynamo and AOTAutograd (the aot_eager backend: the tracing a GPU
    run's inductor compile sees, without its minutes of code generation on 2 cores)."""
    torch.manual_seed(0)
    eager = OMGSeg(tiny()).train()
    _, (images, vocabulary, prompts, targets) = model_and_batch
    compiled = OMGSeg(tiny()).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_parts(backend="aot_eager")
    results = []
    for model in (eager, compiled):
        outputs = model(images, vocabulary, prompts)
        losses = model.loss(outputs, targets)
        sum(losses.values()).backward()
        results.append((outputs.queries.mask_logits, losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (masks, losses, grads), (masks_c, losses_c, grads_c) = results
    torch.testing.assert_close(masks_c, masks, rtol=1e-4, atol=1e-4)
    for key in losses:
        torch.testing.assert_close(losses_c[key], losses[key], rtol=1e-4, atol=1e-5, msg=key)
    assert grads_c.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-3, atol=1e-5, msg=key)
    # An evaluation in the middle of training: predict runs the compiled parts in inference
    # mode, and the next training step must compile (or reuse) its graph and run as before.
    (pred,), (pred_c,) = (model.eval().predict(images[:1], vocabulary) for model in (eager, compiled))
    torch.testing.assert_close(pred_c.class_probs, pred.class_probs, rtol=1e-4, atol=1e-5)
    compiled.train().zero_grad()
    sum(compiled.loss(compiled(images, vocabulary, prompts), targets).values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in compiled.parameters() if p.grad is not None)
