"""A fixed run of the tiny model whose outputs are kept in tests/model/data/golden_tiny.pt, so
that a change made for speed can be checked against what the model computed before it.

The weights are set from each parameter's name (not from the order modules are built in), so
the reference survives changes in construction order. The run covers every path the speed
work touches: a two-frame clip with prompts (one with a further click) next to a clip without,
training with deep supervision (losses and the gradient of every trainable tensor) and
inference with the CLIP ensemble (CLIP weights from a file, seen and unseen classes). The
post-processing is checked against slow references in tests/model/test_inference.py instead:
this random model keeps no panoptic segment.

    python tests/golden_model.py --write     # only to record a deliberate change of outputs
"""

from __future__ import annotations

import argparse
import math
import tempfile
import zlib
from pathlib import Path

import torch

from omgseg.core.structures import Category
from omgseg.model.config import tiny
from omgseg.model.omgseg import OMGSeg
from omgseg.model.structures import MatchTargets, PromptBatch
from omgseg.model.vocabulary import Vocabulary

GOLDEN = Path(__file__).parent / "model" / "data" / "golden_tiny.pt"
H, W = 64, 96


def name_seeded_weights(model: torch.nn.Module) -> None:
    """Every floating parameter from a generator seeded by its name: matrices and kernels
    normal / sqrt(fan-in), norm weights 1, other vectors (biases, scales) normal x 0.02."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point() or param.dim() == 0:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(param[0].numel()))
            elif "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)


def golden_model(folder: Path) -> OMGSeg:
    """The tiny model with name-seeded weights and a CLIP 'checkpoint' in `folder`, so that
    inference uses the CLIP ensemble."""
    import open_clip

    clip_file = folder / "tiny_clip.pt"
    torch.save(open_clip.create_model("tiny_clip").state_dict(), clip_file)
    model = OMGSeg(tiny(clip_checkpoint=str(clip_file)))
    name_seeded_weights(model)
    model.seen_names = {"person", "human", "sky"}
    return model


def golden_inputs() -> tuple[torch.Tensor, Vocabulary, list[PromptBatch], list[MatchTargets]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 2, 3, H, W), dtype=torch.uint8, generator=g)
    vocabulary = Vocabulary.from_categories([
        Category(1, "person", True, ("human",)), Category(2, "car", True), Category(3, "dog", True),
        Category(7, "sky", False),
    ])
    masks = torch.zeros(3, 2, H, W, dtype=torch.bool)
    masks[0, :, 5:30, 10:40] = True
    masks[1, 0, 35:60, 50:90] = True  # absent from the second frame
    masks[2, :, 0:20, 60:96] = True
    clicks = PromptBatch.from_points(
        torch.tensor([[20.0, 15.0], [70.0, 45.0]]), (H, W),
        clicks=torch.tensor([[[25.0, 20.0]], [[0.0, 0.0]]]), click_labels=torch.tensor([[1], [-1]]))
    prompts = [clicks, PromptBatch(torch.zeros(0, 4), (), (H, W))]
    targets = [
        MatchTargets(labels=torch.tensor([0, 3, 1]), masks=masks, track_ids=torch.tensor([1, 2, 3]),
                     prompt_masks=masks[:2], seed=11),
        MatchTargets(labels=torch.tensor([2]), masks=masks[1:2], track_ids=torch.tensor([4]),
                     prompt_masks=masks[:0], seed=12),
    ]
    return images, vocabulary, prompts, targets


def golden_run(model: OMGSeg) -> dict[str, torch.Tensor]:
    """What the reference records: loss terms, every prediction set's logits, every
    trainable gradient's norm, the predictions."""
    images, vocabulary, prompts, targets = golden_inputs()
    out: dict[str, torch.Tensor] = {}
    model.train()
    model.zero_grad(set_to_none=True)
    outputs = model(images, vocabulary, prompts)
    losses = model.loss(outputs, targets)
    sum(losses.values()).backward()
    for name, value in losses.items():
        out[f"loss/{name}"] = value.detach()
    queries = outputs.queries
    for i, pred in enumerate([*queries.aux, queries]):
        out[f"set{i}/class_logits"] = pred.class_logits.detach()
        out[f"set{i}/mask_logits"] = pred.mask_logits.detach()[..., ::3, ::3]
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            out[f"grad/{name}"] = param.grad.norm()
    model.eval()
    with torch.no_grad():
        predictions = model.predict(images, vocabulary, prompts)
    for i, pred in enumerate(predictions):
        out[f"predict{i}/class_probs"] = pred.class_probs
        out[f"predict{i}/mask_logits"] = pred.mask_logits[..., ::7, ::7]
        out[f"predict{i}/prompt_mask_logits"] = pred.prompt_mask_logits[..., ::7, ::7]
        out[f"predict{i}/embeddings"] = pred.embeddings
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the reference in {GOLDEN}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        result = golden_run(golden_model(Path(folder)))
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in result.items()}, GOLDEN)  # views would save their whole storage
        print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, {len(result)} tensors)")
    else:
        print(f"{len(result)} tensors; pass --write to record them")


if __name__ == "__main__":
    main()
