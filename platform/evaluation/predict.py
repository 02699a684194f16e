"""`omgseg predict`: run a checkpoint on images or a video and write the public result formats.

Image tasks (panoptic, instance, semantic, interactive with --points) take an image file or
a folder of images; video tasks (video_instance, video_panoptic, vos with --first-frame-mask)
take a folder of frames (one video), cut into clips whose tubes are linked across clips by
their query embeddings (MinVIS), or, for VOS, re-prompted from the previous clip's last frame.
Every frame also gets an overlay PNG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omgseg.core.structures import Category, Task
from omgseg.datasets.manifest import read_meta
from omgseg.model.checkpoint import load_checkpoint
from omgseg.model.inference import TubeLinker
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.metrics.files import field_errors, read_json
from omgseg.platform.evaluation.writers import (
    CocoInstancesWriter,
    CocoPanopticWriter,
    SemanticWriter,
    YtvisWriter,
    save_overlay,
    write_atomic,
)
from omgseg.platform.tasks import SHOWN_SCORE, TASKS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PREDICT_TASKS = ("panoptic", "instance", "semantic", "interactive", "video_instance", "video_panoptic", "vos")
STUFF_ID_BASE = 1_000_000  # video panoptic: stuff segments get a per-class id above every track id


@dataclass
class PredictSummary:
    task: str
    inputs: int  # images, or frames of the video
    outputs: list[str]


def load_vocabulary(spec: str | None, extra: dict) -> Vocabulary:
    """A shard folder (its meta.json), a COCO-style JSON with 'categories', or (None) the
    vocabulary the checkpoint was trained with."""
    if spec is None:
        saved = extra.get("vocabulary")
        if not saved:
            raise ValueError("the checkpoint holds no vocabulary: pass --vocabulary SHARD_DIR or a JSON with 'categories'")
        return Vocabulary(tuple(saved["names"]), tuple(saved["is_thing"]), tuple(saved["category_ids"]))
    path = Path(spec)
    if path.is_dir():
        return Vocabulary.from_categories(read_meta(path).categories)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{path}: a vocabulary file needs a 'categories' list")
    with field_errors(str(path)):
        return Vocabulary.from_categories([
            Category(int(c["id"]), str(c["name"]), bool(c.get("isthing", 1)), tuple(c.get("synonyms", ())))
            for c in data["categories"]
        ])


def _images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _videos(path: Path, listing: Path | None = None) -> list[list[Path]]:
    """The frames of each video under `path`: itself a folder of frames, or a folder of such
    folders (VIPSeg's images/<video>/ layout), in name order; with `listing` (a text file of
    video names, one per line, as VIPSeg's val.txt), only those."""
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist or is not a folder of frames")
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if listing is not None:
        if not Path(listing).is_file():
            raise FileNotFoundError(f"video list {listing} does not exist")
        wanted = [line.strip() for line in Path(listing).read_text().splitlines() if line.strip()]
        missing = [v for v in wanted if not (path / v).is_dir()]
        if missing:
            raise ValueError(f"{listing}: videos {missing[:5]} have no folder in {path}")
        return [_images(path / v) for v in wanted]
    if folders and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
        return [_images(f) for f in folders]
    return [_images(path)]


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")).copy()
    except (OSError, SyntaxError, ValueError) as err:  # truncated, corrupt, not an image
        raise ValueError(f"cannot read image {path}: {err}") from None


def _image_ids(coco_json: Path | None) -> dict[str, object]:
    if coco_json is None:
        return {}
    data = read_json(coco_json)
    with field_errors(str(coco_json)):
        return {Path(i["file_name"]).name: i["id"] for i in data.get("images", [])}


@dataclass(frozen=True)
class PredictRequest:
    """What `omgseg predict` was asked, checked; each task's handler reads what it needs."""

    task: Task
    inputs: Path
    out: Path
    coco_json: Path | None = None
    clip_length: int = 4
    points: str | None = None
    first_frame_mask: Path | None = None
    videos: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.task is Task.INTERACTIVE) != (self.points is not None):
            raise ValueError("--points goes with --task interactive, and interactive needs --points")
        if (self.task is Task.VOS) != (self.first_frame_mask is not None):
            raise ValueError("--first-frame-mask goes with --task vos, and vos needs --first-frame-mask")
        if self.videos is not None and self.task is not Task.VIDEO_PANOPTIC:
            raise ValueError("--videos goes with --task video_panoptic")
        if self.clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {self.clip_length}")


def predict(
    checkpoint: Path,
    task: str,
    inputs: Path,
    out: Path,
    *,
    vocabulary: str | None = None,
    coco_json: Path | None = None,
    clip_length: int = 4,
    clip_checkpoint: str | None = None,
    points: str | None = None,
    first_frame_mask: Path | None = None,
    videos: Path | None = None,
    progress: bool = True,
) -> PredictSummary:
    if task not in PREDICT_TASKS:
        raise ValueError(f"unknown predict task {task!r}; available: {', '.join(PREDICT_TASKS)}")
    request = PredictRequest(Task(task), Path(inputs), Path(out), None if coco_json is None else Path(coco_json),
                             clip_length, points, None if first_frame_mask is None else Path(first_frame_mask),
                             None if videos is None else Path(videos), progress)
    model, extra = load_checkpoint(checkpoint, clip_checkpoint=clip_checkpoint)
    vocab = load_vocabulary(vocabulary, extra)
    model.eval()
    return HANDLERS[request.task](model, vocab, request)


def _predict_images(model, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Panoptic, instance or semantic on every image: the task's result format and overlays."""
    spec = TASKS[request.task]
    files = _images(request.inputs)
    ids = _image_ids(request.coco_json)
    writer = IMAGE_WRITERS[request.task](request.out, vocab)
    for path in tqdm(files, desc=f"predict {request.task.value}", disable=not request.progress):
        rgb = _read_rgb(path)
        (pred,) = model.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None, None], vocab)
        result = spec.postprocess(model, pred, vocab)
        writer.add(ids.get(path.name, path.stem), path.name, result)
        save_overlay(request.out / "overlays" / f"{path.stem}.png", rgb, spec.id_maps(result, (1, *rgb.shape[:2]))[0])
    written = writer.close()
    return PredictSummary(task=request.task.value, inputs=len(files), outputs=[str(written), str(request.out / "overlays")])


def _predict_video(model, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Clips of clip_length frames; tubes linked across clips; one YouTube-VIS entry per track."""
    frames, out, clip_length, progress = _images(request.inputs), request.out, request.clip_length, request.progress
    linker = TubeLinker()
    tubes: dict[int, np.ndarray] = {}
    rgb0 = _read_rgb(frames[0])
    total = len(frames)
    for start in tqdm(range(0, total, clip_length), desc="predict video_instance", disable=not progress):
        clip = [_read_rgb(p) for p in frames[start:start + clip_length]]
        images = torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2)[None]
        (pred,) = model.predict(images, vocab)
        track_ids = linker.link(pred.embeddings)
        linker.add_scores(track_ids, pred.class_probs)
        masks = (pred.mask_logits.sigmoid() > 0.5).numpy()  # (Q, t, H, W)
        for q, track in enumerate(track_ids.tolist()):
            if track not in tubes:
                tubes[track] = np.zeros((total, *rgb0.shape[:2]), dtype=bool)
            tubes[track][start:start + len(clip)] = masks[q]
    tracks, scores = linker.video_scores()
    things = torch.tensor(vocab.is_thing)
    writer = YtvisWriter(out, vocab)
    labels, values = [], []
    for row in scores:
        thing_scores = torch.where(things, row[:-1], torch.zeros_like(row[:-1]))
        labels.append(int(thing_scores.argmax()))
        values.append(float(thing_scores.max()))
    kept = [i for i, track in enumerate(tracks.tolist()) if tubes[track].any() and values[i] > 0]
    writer.add(frames[0].parent.name, np.stack([tubes[tracks[i].item()] for i in kept]) if kept else
               np.zeros((0, total, *rgb0.shape[:2]), bool), [labels[i] for i in kept], [values[i] for i in kept])
    for t, path in enumerate(frames):
        shown = np.zeros(rgb0.shape[:2], dtype=np.int64)
        for rank, i in enumerate(sorted(kept, key=lambda i: -values[i])):
            if values[i] >= SHOWN_SCORE:
                shown[tubes[tracks[i].item()][t] & (shown == 0)] = rank + 1
        save_overlay(out / "overlays" / f"{path.stem}.png", _read_rgb(path), shown)
    written = writer.close()
    return PredictSummary(task="video_instance", inputs=total, outputs=[str(written), str(out / "overlays")])


def parse_points(text: str) -> torch.Tensor:
    """"x,y;x,y" -> (K, 2) float clicks in pixels."""
    try:
        points = [tuple(float(v) for v in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        raise ValueError(f"--points must look like 'x,y;x,y', got {text!r}") from None
    if not points or any(len(p) != 2 for p in points):
        raise ValueError(f"--points must look like 'x,y;x,y', got {text!r}")
    return torch.tensor(points, dtype=torch.float32)


def _save_indices(path: Path, indices: np.ndarray) -> None:
    """Object indices (0 = background) as a palette PNG, as DAVIS stores masks."""
    from PIL import Image

    from omgseg.datasets.synth import davis_palette

    if indices.max(initial=0) > 255:
        raise ValueError(f"{path}: more than 255 objects do not fit a palette PNG")
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(davis_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")
    image.save(partial)
    partial.replace(path)


def _indices(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(K, H, W) probabilities -> (H, W) index of the most likely object above threshold, else 0."""
    if probs.shape[0] == 0:
        return np.zeros(probs.shape[1:], dtype=np.int64)
    best = probs.argmax(0)
    return np.where(probs.max(0) > threshold, best + 1, 0)


def _predict_clicks(model, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """One mask per click (the same clicks on every image given)."""
    files, out, clicks = _images(request.inputs), request.out, parse_points(request.points)
    from omgseg.model.structures import PromptBatch

    threshold = model.config.inference.prompt_mask_threshold
    for path in files:
        rgb = _read_rgb(path)
        height, width = rgb.shape[:2]
        outside = [(x, y) for x, y in clicks.tolist() if not (0 <= x < width and 0 <= y < height)]
        if outside:
            raise ValueError(f"{path}: clicks {outside} are outside the {width}x{height} image")
        prompts = PromptBatch.from_points(clicks, (height, width))
        (pred,) = model.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None, None], vocab, [prompts])
        indices = _indices(pred.prompt_mask_logits[:, 0].sigmoid().numpy(), threshold)
        _save_indices(out / "interactive" / f"{path.stem}.png", indices)
        save_overlay(out / "overlays" / f"{path.stem}.png", rgb, indices)
    return PredictSummary(task="interactive", inputs=len(files), outputs=[str(out / "interactive"), str(out / "overlays")])


def _box(mask: np.ndarray) -> list[float] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def _predict_vos(model, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Semi-supervised VOS: objects of the first-frame mask are prompted by their boxes; each
    later clip is prompted by the boxes of the previous clip's last predicted frame (an object
    that vanished keeps its last box)."""
    from PIL import Image

    from omgseg.core.structures import PromptKind
    from omgseg.model.structures import PromptBatch

    frames, first_mask = _images(request.inputs), request.first_frame_mask
    out, clip_length, progress = request.out, request.clip_length, request.progress
    if not first_mask.is_file():
        raise FileNotFoundError(f"first-frame mask {first_mask} does not exist")
    with Image.open(first_mask) as image:
        given = np.asarray(image)
    rgb0 = _read_rgb(frames[0])
    if given.shape != rgb0.shape[:2]:
        raise ValueError(f"{first_mask}: mask is {given.shape}, frames are {rgb0.shape[:2]}")
    objects = [int(i) for i in np.unique(given) if i not in (0, 255)]
    if not objects:
        raise ValueError(f"{first_mask}: no object indices (values other than 0 and 255)")
    boxes = [_box(given == i) for i in objects]
    threshold = model.config.inference.prompt_mask_threshold
    video = out / "vos" / frames[0].parent.name
    for start in tqdm(range(0, len(frames), clip_length), desc="predict vos", disable=not progress):
        clip = [_read_rgb(p) for p in frames[start:start + clip_length]]
        prompts = PromptBatch(torch.tensor(boxes), (PromptKind.BOX,) * len(boxes), rgb0.shape[:2])
        (pred,) = model.predict(torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2)[None], vocab, [prompts])
        probs = pred.prompt_mask_logits.sigmoid().numpy()  # (K, t, H, W)
        for t, rgb in enumerate(clip):
            path = frames[start + t]
            if start + t == 0:
                indices = given.copy()  # the given mask, as DAVIS expects for the first frame
            else:
                winner = _indices(probs[:, t], threshold)  # 0, or k + 1 for object k
                indices = np.where(winner > 0, np.asarray(objects)[np.maximum(winner - 1, 0)], 0)
            _save_indices(video / f"{path.stem}.png", indices)
            save_overlay(out / "overlays" / f"{path.stem}.png", rgb, indices)
        last = probs[:, -1] > threshold
        boxes = [_box(m) or b for m, b in zip(last, boxes)]
    return PredictSummary(task="vos", inputs=len(frames), outputs=[str(video), str(out / "overlays")])


def _predict_video_panoptic(model, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Every video (a list of frames, named by their folder), as VIPSeg's result format, what
    `omgseg eval vipseg` and VIPSeg's eval_vpq_vspw.py read: out/pan_pred/<video>/<frame
    stem>.png (RGB ids) and out/pred.json {"annotations": [{"video_id", "annotations":
    [{"file_name", "segments_info": [{"id", "category_id"}]}, ...one per frame]}, ...one per video]}."""
    videos, out = _videos(request.inputs, request.videos), request.out
    clip_length, progress = request.clip_length, request.progress
    entries = [{"video_id": frames[0].parent.name,
                "annotations": _video_panoptic(model, vocab, frames, out, clip_length, progress, len(videos) > 1)}
               for frames in videos]
    path = out / "pred.json"
    write_atomic(path, json.dumps({"annotations": entries}).encode())
    return PredictSummary(task="video_panoptic", inputs=sum(len(f) for f in videos),
                          outputs=[str(path), str(out / "pan_pred"), str(out / "overlays")])


def _video_panoptic(model, vocab: Vocabulary, frames: list[Path], out: Path, clip_length: int, progress: bool,
                    overlay_per_video: bool) -> list[dict]:
    """One video's frames: per-clip panoptic fusion of tubes; thing ids follow the linked tracks
    across clips, stuff ids follow the class. Writes its PNGs; returns its frame annotations."""
    from PIL import Image

    from omgseg.datasets.clip import encode_id_map_rgb

    linker = TubeLinker()
    video = frames[0].parent.name
    # A segment id names one tube with one category: a track whose class changes between
    # clips gets a new id for the new class.
    thing_ids: dict[tuple[int, int], int] = {}
    annotations = []
    for start in tqdm(range(0, len(frames), clip_length), desc=f"predict video_panoptic {video}", disable=not progress):
        clip = [_read_rgb(p) for p in frames[start:start + clip_length]]
        (pred,) = model.predict(torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2)[None], vocab)
        tracks = linker.link(pred.embeddings).tolist()
        result = TASKS[Task.VIDEO_PANOPTIC].postprocess(model, pred, vocab)
        global_id = {s.id: (thing_ids.setdefault((tracks[s.query], s.label), len(thing_ids) + 1) if s.isthing
                            else STUFF_ID_BASE + s.label) for s in result.segments}
        if len(thing_ids) >= STUFF_ID_BASE:
            raise ValueError(f"{frames[0].parent}: more than {STUFF_ID_BASE - 1} thing tubes do not fit below the stuff ids")
        for t, rgb in enumerate(clip):
            path = frames[start + t]
            local = result.id_map[t].numpy()
            ids = np.zeros_like(local)
            for local_id, gid in global_id.items():
                ids[local == local_id] = gid
            png = out / "pan_pred" / video / f"{path.stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(encode_id_map_rgb(ids.astype(np.uint32))).save(png)
            present = set(np.unique(ids).tolist())
            annotations.append({"file_name": png.name, "segments_info": [
                {"id": gid, "category_id": vocab.category_ids[s.label]}
                for s in result.segments for gid in [global_id[s.id]] if gid in present
            ]})
            save_overlay(out / "overlays" / (video if overlay_per_video else "") / f"{path.stem}.png", rgb, ids)
    # Stuff segments of one class share an id: keep one entry per id and frame.
    for ann in annotations:
        ann["segments_info"] = list({s["id"]: s for s in ann["segments_info"]}.values())
    return annotations


IMAGE_WRITERS = {Task.PANOPTIC: CocoPanopticWriter, Task.INSTANCE: CocoInstancesWriter, Task.SEMANTIC: SemanticWriter}
HANDLERS = {Task.PANOPTIC: _predict_images, Task.INSTANCE: _predict_images, Task.SEMANTIC: _predict_images,
            Task.INTERACTIVE: _predict_clicks, Task.VIDEO_INSTANCE: _predict_video,
            Task.VIDEO_PANOPTIC: _predict_video_panoptic, Task.VOS: _predict_vos}
