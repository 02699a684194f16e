"""Benchmark: OMG-Seg training step and inference against Hugging Face's Mask2Former.

Both models are built with random weights at matching sizes (same backbone family and
widths, same pixel-decoder and decoder depths, same number of queries, same input and
number of loss points) and trained on the same random batch with the same optimizer (fused
AdamW, as the platform's training loop builds it). OMG-Seg's CLIP backbone is
frozen; Mask2Former trains its backbone, as it does by default. Inference is a forward pass
on both sides, both in inference mode (`predict` enters it itself; Mask2Former gets the same):
Mask2Former's model call, OMG-Seg's `predict` (which also classifies with the CLIP ensemble
when CLIP has weights; both leave the masks at a quarter of the input size for
post-processing to upsample).

Times come from one process holding both models, which alternate step by step (the first of
each pair alternating too): the shared machine's speed drifts by 20 % and more within minutes,
and alternating puts both sides under the same drift. Peak memory comes from one process per
model, so that each peak is the model's own. Each side also times its backbone's part of a
training step alone (ours: the frozen tower's forward; Mask2Former's: its backbone's forward
and backward), so the step's remainder, the layers both models train, can be compared too.
`--amp` runs both models' forward passes under bfloat16 autocast, as a CUDA run trains
(`optimizer.amp`); it needs a CPU with bfloat16 instructions (AVX512-BF16 or AMX), where
bfloat16 matrix products run at about 2.7 times the float32 rate. Prints one JSON line.

    python tests/benchmarks/bench_model.py [--sizes tiny mid] [--steps 8] [--amp]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_module
import resource
import sys
import time

import torch

NUM_CLASSES = 10
BATCH = 2


def _sizes(name: str) -> dict:
    """Matching sizes for both models. tiny: our tiny preset; mid: a ConvNeXt-T backbone with
    the paper's pixel decoder and decoder and 100 queries."""
    if name == "tiny":
        return dict(clip="tiny_clip", dims=[40, 80, 160, 320], depths=[2, 2, 6, 2], d=64, heads=4,
                    enc_layers=2, enc_ffn=128, dec_layers=6, dec_ffn=256, queries=20, groups=8,
                    points=1024, size=(96, 128))
    if name == "mid":
        return dict(clip="convnext_tiny", dims=[96, 192, 384, 768], depths=[3, 3, 9, 3], d=256, heads=8,
                    enc_layers=6, enc_ffn=1024, dec_layers=9, dec_ffn=2048, queries=100, groups=32,
                    points=12544, size=(256, 256))
    raise ValueError(f"unknown size {name!r}")


def _batch(size: tuple[int, int], seed: int = 0):
    """Random images and 5 rectangular segments per image."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randint(0, 256, (BATCH, 3, h, w), dtype=torch.uint8, generator=g)
    masks, labels = [], []
    for _ in range(BATCH):
        m = torch.zeros(5, h, w, dtype=torch.bool)
        for k in range(5):
            y, x = int(torch.randint(0, h // 2, (), generator=g)), int(torch.randint(0, w // 2, (), generator=g))
            m[k, y:y + h // 3, x:x + w // 3] = True
        masks.append(m)
        labels.append(torch.randint(0, NUM_CLASSES, (5,), generator=g))
    return images, masks, labels


def _ours(s: dict):
    import open_clip

    from omgseg.model.config import MatcherCosts, ModelConfig
    from omgseg.model.decoder import DecoderConfig
    from omgseg.model.omgseg import OMGSeg
    from omgseg.model.pixel_decoder import PixelDecoderConfig
    from omgseg.model.structures import MatchTargets
    from omgseg.model.vocabulary import Vocabulary
    embed = int(open_clip.get_model_config(s["clip"])["embed_dim"])  # tiny_clip registered by omgseg.model
    config = ModelConfig(
        name=f"bench_{s['clip']}", clip_model=s["clip"],
        pixel_decoder=PixelDecoderConfig(d_model=s["d"], num_layers=s["enc_layers"], num_heads=s["heads"],
                                         ffn_dim=s["enc_ffn"], num_groups=s["groups"]),
        decoder=DecoderConfig(d_model=s["d"], num_heads=s["heads"], ffn_dim=s["dec_ffn"], num_layers=s["dec_layers"],
                              num_object_queries=s["queries"], text_dim=embed),
        matcher=MatcherCosts(num_points=s["points"]), num_points=s["points"], input_size=s["size"],
    )
    model = OMGSeg(config)
    vocabulary = Vocabulary.from_names([f"class {i}" for i in range(NUM_CLASSES)])
    images, masks, labels = _batch(s["size"])
    targets = [MatchTargets(labels=lab, masks=m[:, None], track_ids=torch.arange(5)) for m, lab in zip(masks, labels)]

    def train_step():
        losses = model.loss(model(images[:, None], vocabulary), targets)
        return sum(losses.values())

    def infer():
        return model.predict(images[:1, None], vocabulary)

    def backbone():  # what a training step spends on the frozen tower
        model.tower(images[:, None])

    return model, train_step, infer, backbone


def _hf(s: dict):
    from transformers import ConvNextConfig, Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    backbone = ConvNextConfig(hidden_sizes=s["dims"], depths=s["depths"], out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=s["d"], mask_feature_size=s["d"], hidden_dim=s["d"],
        encoder_feedforward_dim=s["enc_ffn"], encoder_layers=s["enc_layers"],
        decoder_layers=s["dec_layers"] + 1,  # HF counts the prediction from the initial queries as a layer
        num_attention_heads=s["heads"], dim_feedforward=s["dec_ffn"], num_queries=s["queries"],
        train_num_points=s["points"], num_labels=NUM_CLASSES,
    )
    model = Mask2FormerForUniversalSegmentation(config)
    images, masks, labels = _batch(s["size"])
    pixels = (images.float() / 255 - 0.45) / 0.27

    def train_step():
        out = model(pixel_values=pixels, mask_labels=[m.float() for m in masks], class_labels=labels)
        return out.loss

    def infer():
        return model(pixel_values=pixels[:1])

    def backbone():  # what a training step spends on the trained backbone: forward and backward
        maps = model.model.pixel_level_module.encoder(pixels).feature_maps
        sum(m.sum() for m in maps).backward()

    return model, train_step, infer, backbone


def autocast(amp: bool) -> torch.autocast:
    """bfloat16 autocast on the CPU when `amp`, as the platform's train_step runs on CUDA."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 autocast, as a CUDA run trains (needs a CPU with bfloat16 instructions)")


def check_amp(parser: argparse.ArgumentParser, amp: bool) -> None:
    """Refuse --amp on a CPU without bfloat16 instructions: emulated bfloat16 times mean nothing."""
    if amp and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        parser.error("--amp: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); emulated bfloat16 times mean nothing")


def precision(amp: bool) -> str:
    """The precision named in a benchmark's JSON line."""
    return "bfloat16 autocast" if amp else "float32"


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


class _Side:
    """One model ready to time: its training step (forward, losses, backward, fused AdamW, as
    the platform's training loop builds it), its backbone's part of that step, its inference."""

    def __init__(self, which: str, size: str, amp: bool = False) -> None:
        self.model, self._loss, self._infer, self._backbone = (_ours if which == "omgseg" else _hf)(_sizes(size))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4, fused=True)
        self.amp = amp

    def train_step(self) -> None:
        self.model.train()
        with autocast(self.amp):  # the forward pass and losses, as the platform's train_step
            loss = self._loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def backbone(self) -> None:
        with autocast(self.amp):
            self._backbone()

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode(), autocast(self.amp):
            self._infer()


def _peak_memory(which: str, size: str, steps: int, amp: bool, queue) -> None:
    """In a process of its own: as many training steps, backbone passes and inferences as
    the timings run (the allocator's footprint grows over the first steps); the peak."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    side = _Side(which, size, amp)
    for run_once in (side.train_step, side.backbone, side.infer):
        for _ in range(steps + 1):
            run_once()
    queue.put({
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_total": sum(p.numel() for p in side.model.parameters()),
        "params_trainable": sum(p.numel() for p in side.trainable),
    })


def _timings(size: str, steps: int, amp: bool, queue) -> None:
    """Both models in one process, alternating step by step; the first pair is not timed
    (allocations, caches). Per side: seconds per image of each training step, backbone part
    and inference."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    sides = {name: _Side(name, size, amp) for name in ("omgseg", "mask2former_hf")}
    times = {name: {"train_s": [], "backbone_s": [], "infer_s": []} for name in sides}
    for key, action, per_image in (("train_s", "train_step", BATCH), ("backbone_s", "backbone", BATCH),
                                   ("infer_s", "infer", 1)):
        for i in range(steps + 1):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for name in order:
                run_once = getattr(sides[name], action)
                start = time.perf_counter()
                run_once()
                if i > 0:
                    times[name][key].append((time.perf_counter() - start) / per_image)
        for side in sides.values():
            side.optimizer.zero_grad(set_to_none=True)
    queue.put(times)


def _in_process(target, *args) -> dict:
    """target(*args, queue) in a fresh process; an error if it dies without a result."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__}{args} failed (exit {proc.exitcode})") from None
    proc.join()
    return result


def summary(times: dict, memory: dict) -> dict:
    """Medians per image (a pass disturbed by anything else on the machine does not move them)."""
    train, backbone = _median(times["train_s"]), _median(times["backbone_s"])
    return {
        "train_s_per_image": train,
        "backbone_in_train_s_per_image": backbone,
        "train_rest_s_per_image": train - backbone,
        "infer_s_per_image": _median(times["infer_s"]),
        **memory,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--steps", type=int, default=8,
                        help="timed training steps, backbone passes and inferences per model")
    add_amp_argument(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    check_amp(parser, args.amp)
    results: dict[str, object] = {"benchmark": "bench_model", "batch": BATCH, "device": "cpu", "threads": 2,
                                  "steps": args.steps, "precision": precision(args.amp)}
    for size in args.sizes:
        print(f"{size}: peak memory, one process per model", file=sys.stderr)
        memory = {name: _in_process(_peak_memory, name, size, args.steps, args.amp) for name in ("omgseg", "mask2former_hf")}
        print(f"{size}: times, both models alternating in one process", file=sys.stderr)
        times = _in_process(_timings, size, args.steps, args.amp)
        ours, theirs = (summary(times[name], memory[name]) for name in ("omgseg", "mask2former_hf"))
        print(f"{size}: omgseg {ours}\n{size}: mask2former {theirs}", file=sys.stderr)
        results[size] = {
            "input": list(_sizes(size)["size"]),
            "omgseg": {k: round(v, 4) if isinstance(v, float) else v for k, v in ours.items()},
            "mask2former_hf": {k: round(v, 4) if isinstance(v, float) else v for k, v in theirs.items()},
            "train_time_ratio": round(ours["train_s_per_image"] / theirs["train_s_per_image"], 3),
            # the layers both models train (the step without the backbone's part)
            "train_rest_time_ratio": round(ours["train_rest_s_per_image"] / theirs["train_rest_s_per_image"], 3),
            "infer_time_ratio": round(ours["infer_s_per_image"] / theirs["infer_s_per_image"], 3),
            "peak_rss_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
