"""Profile: where a training step and an inference of OMG-Seg spend their time, part by part.

Builds the models of bench_model.py (same sizes, same random batch) and runs `--steps`
training steps (forward, losses, backward, AdamW) and `--steps` inferences (`predict`, then
panoptic, instance and semantic post-processing) under torch.profiler. Every operator's own
CPU time is charged to the innermost model part it ran in (the parts are marked from outside
the model, by module hooks and wrappers, so the model code carries no profiling marks); a
backward operator is charged to the part whose forward operator created it (autograd's
sequence numbers link the two). Prints one markdown table per size and mode, then one JSON
line.

    python tests/benchmarks/profile_model.py [--sizes tiny mid] [--steps 3] [--amp] [--mask2former]

`--amp`: under bfloat16 autocast, as a CUDA run trains (needs a CPU with bfloat16 instructions).
`--mask2former`: also profiles bench_model's Hugging Face Mask2Former (same size, batch and
optimizer), its modules marked as the same parts where the two models have them, and prints
one table per size and mode with both side by side (inference: the model call on both sides,
without our post-processing).

The profiler adds a few microseconds per operator, so small models look slower than they run:
read the shares, and take timings from bench_model.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import BATCH, _hf, _ours, _sizes, add_amp_argument, autocast, check_amp, precision  # noqa: E402  (the benchmark's models, batch and --amp)

import omgseg.model.criterion as criterion_module  # noqa: E402
import omgseg.model.inference as inference_module  # noqa: E402
import omgseg.model.pixel_decoder as pixel_decoder_module  # noqa: E402
from omgseg.model.inference import instance_inference, panoptic_inference, semantic_inference  # noqa: E402

MARK = "omgseg/"  # prefix of the profiler ranges this script opens for the parts
STEP = "profiled step"  # the range around one step or inference
BACKWARD = "autograd::engine::evaluate_function: "
OUTSIDE = "outside the parts (loss sum, text embeddings, checks)"
MATCHING = "matching"  # a part of both models, named alike
OPTIMIZER = "optimizer (AdamW)"

# The parts both models have, for the side-by-side table: each of our parts belongs to one.
BACKBONE = "backbone"
DEFORMABLE = "pixel decoder: deformable attention"
PIXEL_REST = "pixel decoder: encoder FFN, norms, projections, stride-4 convolutions"
DECODER_LAYERS = "decoder layers: cross-attention, self-attention, FFN"
DECODER_REST = "decoder: queries, heads, mask logits, attention masks"
LOSSES = "losses (with the uncertain point selection)"
POST_PROCESSING = "post-processing and upsampling (ours only)"


def _mark_module(module: torch.nn.Module, name: str) -> None:
    """Open a profiler range named `name` around every forward call of `module`."""
    open_ranges: list[record_function] = []

    def enter(_module, _args):
        rng = record_function(MARK + name)
        rng.__enter__()
        open_ranges.append(rng)

    def leave(_module, _args, _output):
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def _marked(name: str, fn: Callable) -> Callable:
    """`fn` inside a profiler range named `name`; marking a marked function again (a second
    size marks the same module functions) replaces the mark instead of nesting it."""
    fn = getattr(fn, "_unmarked", fn)

    def wrapper(*args, **kwargs):
        with record_function(MARK + name):
            return fn(*args, **kwargs)

    wrapper._unmarked = fn
    return wrapper


def _mark_parts(model: torch.nn.Module) -> None:
    """Mark the parts the breakdown reports; the innermost mark wins."""
    _mark_module(model.backbone, "backbone (frozen CLIP tower)")
    pixel_decoder = model.pixel_decoder
    _mark_module(pixel_decoder, "pixel decoder: encoder FFN, norms, position encodings")
    for projection in pixel_decoder.input_proj:
        _mark_module(projection, "pixel decoder: input projections")
    for conv in (pixel_decoder.lateral_conv, pixel_decoder.output_conv, pixel_decoder.mask_features):
        _mark_module(conv, "pixel decoder: stride-4 convolutions (FPN, mask features)")
    for layer in model.pixel_decoder.layers:
        _mark_module(layer.self_attn, "pixel decoder: deformable attention (projections)")
    pixel_decoder_module.sample_pixels = _marked(
        "pixel decoder: deformable attention (sampling)", pixel_decoder_module.sample_pixels)
    decoder = model.decoder
    _mark_module(decoder, "decoder: queries, position encodings")
    for layer in decoder.cross_layers:
        _mark_module(layer, "decoder layers: masked cross-attention")
    for layer in decoder.self_layers:
        _mark_module(layer, "decoder layers: self-attention")
    for layer in decoder.ffn_layers:
        _mark_module(layer, "decoder layers: FFN")
    heads = "decoder: heads, mask logits, attention masks"
    for module in (decoder.decoder_norm, decoder.mask_embed):
        _mark_module(module, heads)
    decoder._heads = _marked(heads, decoder._heads)
    decoder._attention_mask = _marked(heads, decoder._attention_mask)
    matcher = model.criterion.matcher
    matcher.match_sets = _marked(MATCHING, matcher.match_sets)
    model.criterion = _Marked("losses", model.criterion)
    for name in ("_draw_points", "_most_uncertain"):
        setattr(criterion_module, name, _marked("losses: uncertain point selection", getattr(criterion_module, name)))
    model.clip_logits = _marked("inference: CLIP ensemble", model.clip_logits)
    inference_module.upsample_masks = _marked("inference: upsampling masks", inference_module.upsample_masks)


class _Marked:
    """A callable object (the criterion, the matcher) inside a profiler range, its attributes kept."""

    def __init__(self, name: str, inner) -> None:
        self._name = name
        self._inner = inner

    def __call__(self, *args, **kwargs):
        with record_function(MARK + self._name):
            return self._inner(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def common_part(part: str) -> str:
    """The part both models have that one of our parts belongs to."""
    if part.startswith("backbone"):
        return BACKBONE
    if part.startswith("pixel decoder: deformable attention"):
        return DEFORMABLE
    if part.startswith("pixel decoder"):
        return PIXEL_REST
    if part.startswith("decoder layers"):
        return DECODER_LAYERS
    if part.startswith("decoder"):
        return DECODER_REST
    if part.startswith("losses"):
        return LOSSES
    if part.startswith(("post-processing", "inference: upsampling")):
        return POST_PROCESSING
    return part  # matching, the optimizer, the CLIP ensemble, outside the parts, gradient accumulation


def _mark_mask2former_parts(model: torch.nn.Module) -> None:
    """Mark Hugging Face's Mask2Former with the common parts; the innermost mark wins."""
    pixel_level = model.model.pixel_level_module
    _mark_module(pixel_level.encoder, BACKBONE)
    _mark_module(pixel_level.decoder, PIXEL_REST)
    for layer in pixel_level.decoder.encoder.layers:
        _mark_module(layer.self_attn, DEFORMABLE)
    transformer = model.model.transformer_module
    _mark_module(transformer, DECODER_REST)
    for layer in transformer.decoder.layers:
        _mark_module(layer, DECODER_LAYERS)
    _mark_module(transformer.decoder.mask_predictor, DECODER_REST)
    _mark_module(model.class_predictor, DECODER_REST)
    _mark_module(model.criterion, LOSSES)
    _mark_module(model.criterion.matcher, MATCHING)


def _breakdown(events) -> tuple[dict[str, float], dict[str, float]]:
    """(forward ms, backward ms) per part from the profiler's events. An operator's own time
    goes to its innermost mark; a backward operator's to the mark of the forward operator that
    recorded it (same sequence number)."""

    def mark_of(event) -> str | None:
        while event is not None:
            if event.name.startswith(MARK):
                return event.name[len(MARK):]
            event = event.cpu_parent
        return None

    forward_mark: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD) and event.fwd_thread == 0:
            forward_mark.setdefault(event.sequence_nr, mark_of(event) or OUTSIDE)

    def backward_root(event):
        while event is not None and not event.name.startswith(BACKWARD):
            event = event.cpu_parent
        return event

    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    for event in events:
        ms = event.self_cpu_time_total / 1000
        root = backward_root(event)
        if root is not None:
            backward[forward_mark.get(root.sequence_nr, "gradient accumulation")] += ms
        elif _inside(event, "Optimizer."):
            forward[OPTIMIZER] += ms
        else:
            forward[mark_of(event) or OUTSIDE] += ms
    return dict(forward), dict(backward)


def _inside(event, prefix: str) -> bool:
    while event is not None:
        if event.name.startswith(prefix):
            return True
        event = event.cpu_parent
    return False


def _table(title: str, forward: dict[str, float], backward: dict[str, float], steps: int, wall_ms: float) -> str:
    parts = sorted(set(forward) | set(backward), key=lambda p: -(forward.get(p, 0) + backward.get(p, 0)))
    total = sum(forward.values()) + sum(backward.values())
    lines = [f"{title}: {wall_ms:.1f} ms per step under the profiler", "",
             "| part | forward ms | backward ms | share |", "| --- | ---: | ---: | ---: |"]
    for part in parts:
        fwd, bwd = forward.get(part, 0.0) / steps, backward.get(part, 0.0) / steps
        lines.append(f"| {part} | {fwd:.1f} | {bwd:.1f} | {100 * (fwd + bwd) * steps / total:.0f} % |")
    return "\n".join(lines)


MODES = ("train", "infer")


@dataclass
class _Profiled:
    """One model's training step and inference, each inside the STEP range, and what the
    profiler gave for them per mode: forward and backward ms per part and wall ms, summed
    over steps."""

    train_step: Callable[[], None]
    inference: Callable[[], None]
    set_mode: Callable[[bool], object]  # the model's train(mode)
    forward: dict[str, dict[str, float]] = field(default_factory=lambda: {m: defaultdict(float) for m in MODES})
    backward: dict[str, dict[str, float]] = field(default_factory=lambda: {m: defaultdict(float) for m in MODES})
    wall_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))

    def run(self, mode: str) -> None:
        self.set_mode(mode == "train")
        (self.train_step if mode == "train" else self.inference)()

    def add(self, mode: str, events) -> None:
        forward, backward = _breakdown(events)
        for total, breakdown in ((self.forward[mode], forward), (self.backward[mode], backward)):
            for part, ms in breakdown.items():
                total[part] += ms
        self.wall_ms[mode] += sum(e.cpu_time_total for e in events if e.name == STEP) / 1000


def _profile_alternating(models: list[_Profiled], steps: int) -> None:
    """Training steps, then inferences, of every model under the profiler, one profiler
    session per step and model, the models alternating step by step (the first of each
    round alternating too), so that the machine's drift, 20 % and more within minutes here,
    falls on all of them alike."""
    for mode in MODES:
        for model in models:
            model.run(mode)  # warm-up: allocations, caches
        for i in range(steps):
            for model in (models if i % 2 == 0 else models[::-1]):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model.run(mode)
                model.add(mode, prof.events())


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def _training_step(loss_of_step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, amp: bool) -> Callable[[], None]:
    def train_step() -> None:
        with record_function(STEP):
            with autocast(amp):
                loss = loss_of_step()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return train_step


def _omgseg(size: str, amp: bool) -> _Profiled:
    """Our model, its parts marked; inference is `predict` and the three post-processings."""
    torch.manual_seed(0)
    model, loss_of_step, infer, _ = _ours(_sizes(size))
    _mark_parts(model)

    def inference() -> None:
        with record_function(STEP), torch.inference_mode(), autocast(amp):
            (pred,) = infer()
            with record_function(MARK + "post-processing (panoptic, instance, semantic)"):
                is_thing = torch.arange(pred.class_probs.shape[1] - 1) % 2 == 0
                # as the task table calls them: tubes at the decoder's resolution, upsampled
                # by each function to the input size (panoptic and instance: only those kept)
                low, image_size = pred.low_res_mask_logits, pred.image_size
                panoptic_inference(pred.class_probs, low, is_thing, size=image_size)
                instance_inference(pred.class_probs, low, is_thing, size=image_size)
                semantic_inference(pred.class_probs, low, size=image_size)

    return _Profiled(_training_step(loss_of_step, _optimizer(model), amp), inference, model.train)


def _mask2former(size: str, amp: bool) -> _Profiled:
    """Hugging Face's Mask2Former of bench_model, marked with the common parts; inference is its model call."""
    torch.manual_seed(0)
    model, loss_of_step, infer, _ = _hf(_sizes(size))
    _mark_mask2former_parts(model)

    def inference() -> None:
        with record_function(STEP), torch.inference_mode(), autocast(amp):
            infer()

    return _Profiled(_training_step(loss_of_step, _optimizer(model), amp), inference, model.train)


def _by_common_part(breakdowns: list[dict[str, float]], steps: int) -> dict[str, float]:
    """Forward and backward ms per step summed into the common parts."""
    total: dict[str, float] = defaultdict(float)
    for breakdown in breakdowns:
        for part, ms in breakdown.items():
            total[common_part(part)] += ms / steps
    return {part: round(ms, 1) for part, ms in total.items()}


def side_by_side(title: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    """Markdown: ms per step of each common part, ours and Mask2Former's, largest first."""
    parts = sorted(set(ours) | set(theirs), key=lambda p: -max(ours.get(p, 0.0), theirs.get(p, 0.0)))
    lines = [f"{title}, ms per step under the profiler (forward + backward)", "",
             "| part | omgseg | Mask2Former | ours / theirs |", "| --- | ---: | ---: | ---: |"]
    for part in parts:
        a, b = ours.get(part, 0.0), theirs.get(part, 0.0)
        lines.append(f"| {part} | {a:.1f} | {b:.1f} | {f'{a / b:.2f}' if b > 0 else '-'} |")
    a, b = sum(ours.values()), sum(theirs.values())
    lines.append(f"| **total** | **{a:.1f}** | **{b:.1f}** | **{a / b:.2f}** |")
    return "\n".join(lines)


def profile_size(size: str, steps: int, amp: bool = False, mask2former: bool = False) -> dict:
    """Our tables for one size (and the side-by-side ones with `mask2former`); the JSON entry."""
    ours = _omgseg(size, amp)
    models = [ours] + ([_mask2former(size, amp)] if mask2former else [])
    _profile_alternating(models, steps)
    train_ms, infer_ms = ours.wall_ms["train"] / steps, ours.wall_ms["infer"] / steps
    print(_table(f"{size}, training step ({BATCH} images)", ours.forward["train"], ours.backward["train"], steps, train_ms), "\n")
    print(_table(f"{size}, inference (1 image)", ours.forward["infer"], ours.backward["infer"], steps, infer_ms), "\n")

    def per_step(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v / steps, 2) for k, v in d.items()}

    result: dict[str, object] = {
        "train_ms": round(train_ms, 1), "train_forward_ms": per_step(ours.forward["train"]),
        "train_backward_ms": per_step(ours.backward["train"]),
        "infer_ms": round(infer_ms, 1), "infer_ms_by_part": per_step(ours.forward["infer"])}
    if mask2former:
        theirs = models[1]
        common = {
            "omgseg_train": _by_common_part([ours.forward["train"], ours.backward["train"]], steps),
            "omgseg_infer": _by_common_part([ours.forward["infer"]], steps),
            "mask2former_train": _by_common_part([theirs.forward["train"], theirs.backward["train"]], steps),
            "mask2former_infer": _by_common_part([theirs.forward["infer"]], steps),
        }
        common["omgseg_infer"].pop(POST_PROCESSING, None)  # Mask2Former's model call does none
        print(side_by_side(f"{size}, training step ({BATCH} images)", common["omgseg_train"], common["mask2former_train"]), "\n")
        print(side_by_side(f"{size}, inference (1 image, model call)", common["omgseg_infer"], common["mask2former_infer"]), "\n")
        result["by_common_part_ms"] = common
        result["mask2former_train_ms"] = round(theirs.wall_ms["train"] / steps, 1)
        result["mask2former_infer_ms"] = round(theirs.wall_ms["infer"] / steps, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps (and inferences)")
    add_amp_argument(parser)
    parser.add_argument("--mask2former", action="store_true",
                        help="also profile Hugging Face's Mask2Former, alternating with ours, and print both side by side")
    args = parser.parse_args(argv)
    check_amp(parser, args.amp)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(2)
    results: dict[str, object] = {"benchmark": "profile_model", "batch": BATCH, "threads": 2,
                                  "precision": precision(args.amp)}
    for size in args.sizes:
        results[size] = profile_size(size, args.steps, args.amp, args.mask2former)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
