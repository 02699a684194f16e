"""`omgseg predict`: run a checkpoint on images or a video and write the public result formats.

Image tasks (panoptic, instance, semantic, interactive with --points) take an image file or
a folder of images; video tasks (video_instance, video_panoptic, vos with --first-frame-mask)
take a folder of frames (one video), cut into clips whose tubes are linked across clips by
their query embeddings (MinVIS), or, for VOS, re-prompted from the previous clip's last frame.
Every frame also gets an overlay PNG.

Each task's entry in platform/tasks.py chooses its handler here (`predict_files`) and
post-processes the model's predictions with the model's own inference settings; the handlers
take that entry as their first argument.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from omgseg.core.structures import Category, PromptKind, Task
from omgseg.datasets.manifest import read_meta
from omgseg.datasets.prompts import tight_box
from omgseg.model.inference import InstanceResult, PromptResult, TubeLinker
from omgseg.model.structures import PromptBatch
from omgseg.model.vocabulary import Vocabulary
from omgseg.platform.evaluation.metrics.files import field_errors, read_json
from omgseg.platform.evaluation.writers import YtvisWriter, save_overlay, write_atomic

if TYPE_CHECKING:
    from omgseg.model.omgseg import OMGSeg
    from omgseg.platform.tasks import TaskSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
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

    checkpoint: Path
    task: Task
    inputs: Path
    out: Path
    vocabulary: str | None = None  # a shard folder or a JSON with 'categories'; None: the checkpoint's
    coco_json: Path | None = None
    clip_length: int = 4
    clip_checkpoint: str | None = None
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


def predict(request: PredictRequest) -> PredictSummary:
    """Load the checkpoint and its vocabulary, then the task's handler (its entry in platform/tasks.py)."""
    from omgseg.model.checkpoint import load_checkpoint  # open_clip: only when a checkpoint is loaded
    from omgseg.platform.tasks import TASKS  # the task table imports this module: looked up when called

    model, extra = load_checkpoint(request.checkpoint, clip_checkpoint=request.clip_checkpoint)
    vocab = load_vocabulary(request.vocabulary, extra)
    model.eval()
    return TASKS[request.task].predict_files(model, vocab, request)


def _frames_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (1, T, 3, H, W), one clip for the model."""
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[None]


def predict_images(spec: TaskSpec, model: OMGSeg, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Panoptic, instance or semantic on every image: the task's result format (`spec.writer`) and overlays."""
    files = _images(request.inputs)
    ids = _image_ids(request.coco_json)
    writer = spec.writer(request.out, vocab)
    for path in tqdm(files, desc=f"predict {spec.name}", disable=not request.progress):
        rgb = _read_rgb(path)
        (pred,) = model.predict(_frames_tensor([rgb]), vocab)
        result = spec.postprocess(model, pred, vocab)
        writer.add(ids.get(path.name, path.stem), path.name, result)
        save_overlay(request.out / "overlays" / f"{path.stem}.png", rgb, spec.id_maps(result, (1, *rgb.shape[:2]))[0])
    written = writer.close()
    return PredictSummary(task=spec.name, inputs=len(files), outputs=[str(written), str(request.out / "overlays")])


def predict_video_instances(spec: TaskSpec, model: OMGSeg, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Clips of clip_length frames, each post-processed as the task does it (its instances, with
    the model's settings); the queries' tubes linked across clips into tracks (MinVIS), a
    track's class from its class probabilities averaged over the clips; one YouTube-VIS entry
    per track."""
    frames, out = _images(request.inputs), request.out
    linker = TubeLinker()
    height, width = _read_rgb(frames[0]).shape[:2]
    total = len(frames)
    tubes: dict[int, np.ndarray] = {}  # per track: (total, H, W) bool
    for start in tqdm(range(0, total, request.clip_length), desc=f"predict {spec.name}", disable=not request.progress):
        clip = [_read_rgb(p) for p in frames[start:start + request.clip_length]]
        (pred,) = model.predict(_frames_tensor(clip), vocab)
        tracks = linker.link(pred.embeddings)
        linker.add_scores(tracks, pred.class_probs)
        result = spec.postprocess(model, pred, vocab)
        for mask, query in zip(result.masks.numpy(), result.queries.tolist()):  # a query kept for several classes: one mask
            tube = tubes.setdefault(int(tracks[query]), np.zeros((total, height, width), dtype=bool))
            tube[start:start + len(clip)] = mask
    track_ids, scores = linker.video_scores()
    things = torch.tensor(vocab.is_thing)
    kept = []  # (score, label, track) of every track with a mask and a thing class
    for track, row in zip(track_ids.tolist(), scores):
        thing_scores = torch.where(things, row[:-1], torch.zeros_like(row[:-1]))
        if track in tubes and tubes[track].any() and float(thing_scores.max()) > 0:
            kept.append((float(thing_scores.max()), int(thing_scores.argmax()), track))
    kept.sort(key=lambda k: -k[0])
    video = InstanceResult(
        masks=torch.from_numpy(np.stack([tubes[t] for _, _, t in kept]) if kept else np.zeros((0, total, height, width), bool)),
        labels=torch.tensor([label for _, label, _ in kept], dtype=torch.int64),
        scores=torch.tensor([score for score, _, _ in kept]), queries=torch.tensor([t for _, _, t in kept]))
    writer = YtvisWriter(out, vocab)
    writer.add(frames[0].parent.name, video.masks.numpy(), video.labels.tolist(), video.scores.tolist())
    shown = spec.id_maps(video, (total, height, width))
    for t, path in enumerate(frames):
        save_overlay(out / "overlays" / f"{path.stem}.png", _read_rgb(path), shown[t])
    written = writer.close()
    return PredictSummary(task=spec.name, inputs=total, outputs=[str(written), str(out / "overlays")])


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


def _object_indices(result: PromptResult, logits: torch.Tensor) -> np.ndarray:
    """(T, H, W) object index k + 1 of the prompt whose mask covers a pixel (the most likely one
    where masks overlap), 0 where none does. result: the task's post-processing of `logits` (K, T, H, W)."""
    if result.masks.shape[0] == 0:
        return np.zeros(result.masks.shape[1:], dtype=np.int64)
    best = torch.where(result.masks, logits.float(), torch.tensor(float("-inf"))).argmax(0)
    return torch.where(result.masks.any(0), best + 1, 0).numpy()


def predict_clicks(spec: TaskSpec, model: OMGSeg, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """One mask per click (the same clicks on every image given)."""
    files, out, clicks = _images(request.inputs), request.out, parse_points(request.points)
    for path in files:
        rgb = _read_rgb(path)
        height, width = rgb.shape[:2]
        outside = [(x, y) for x, y in clicks.tolist() if not (0 <= x < width and 0 <= y < height)]
        if outside:
            raise ValueError(f"{path}: clicks {outside} are outside the {width}x{height} image")
        (pred,) = model.predict(_frames_tensor([rgb]), vocab, [PromptBatch.from_points(clicks, (height, width))])
        indices = _object_indices(spec.postprocess(model, pred, vocab), pred.prompt_mask_logits)[0]
        _save_indices(out / "interactive" / f"{path.stem}.png", indices)
        save_overlay(out / "overlays" / f"{path.stem}.png", rgb, indices)
    return PredictSummary(task=spec.name, inputs=len(files), outputs=[str(out / "interactive"), str(out / "overlays")])


def predict_vos(spec: TaskSpec, model: OMGSeg, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Semi-supervised VOS: objects of the first-frame mask are prompted by their boxes; each
    later clip is prompted by the boxes of the previous clip's last predicted frame (an object
    that vanished keeps its last box)."""
    from PIL import Image

    frames, first_mask, out = _images(request.inputs), request.first_frame_mask, request.out
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
    boxes = [tight_box(torch.from_numpy(given == i)).tolist() for i in objects]
    video = out / "vos" / frames[0].parent.name
    for start in tqdm(range(0, len(frames), request.clip_length), desc=f"predict {spec.name}", disable=not request.progress):
        clip = [_read_rgb(p) for p in frames[start:start + request.clip_length]]
        prompts = PromptBatch(torch.tensor(boxes), (PromptKind.BOX,) * len(boxes), rgb0.shape[:2])
        (pred,) = model.predict(_frames_tensor(clip), vocab, [prompts])
        result = spec.postprocess(model, pred, vocab)
        winners = _object_indices(result, pred.prompt_mask_logits)  # (t, H, W): 0, or k + 1 for object k
        for t, rgb in enumerate(clip):
            path = frames[start + t]
            if start + t == 0:
                indices = given.copy()  # the given mask, as DAVIS expects for the first frame
            else:
                indices = np.where(winners[t] > 0, np.asarray(objects)[np.maximum(winners[t] - 1, 0)], 0)
            _save_indices(video / f"{path.stem}.png", indices)
            save_overlay(out / "overlays" / f"{path.stem}.png", rgb, indices)
        last = result.masks[:, -1]
        boxes = [tight_box(m).tolist() if m.any() else b for m, b in zip(last, boxes)]
    return PredictSummary(task=spec.name, inputs=len(frames), outputs=[str(video), str(out / "overlays")])


def predict_video_panoptic(spec: TaskSpec, model: OMGSeg, vocab: Vocabulary, request: PredictRequest) -> PredictSummary:
    """Every video (a list of frames, named by their folder), as VIPSeg's result format, what
    `omgseg eval vipseg` and VIPSeg's eval_vpq_vspw.py read: out/pan_pred/<video>/<frame
    stem>.png (RGB ids) and out/pred.json {"annotations": [{"video_id", "annotations":
    [{"file_name", "segments_info": [{"id", "category_id"}]}, ...one per frame]}, ...one per video]}."""
    videos, out = _videos(request.inputs, request.videos), request.out
    entries = [{"video_id": frames[0].parent.name,
                "annotations": _video_panoptic(spec, model, vocab, frames, request, len(videos) > 1)} for frames in videos]
    path = out / "pred.json"
    write_atomic(path, json.dumps({"annotations": entries}).encode())
    return PredictSummary(task=spec.name, inputs=sum(len(f) for f in videos),
                          outputs=[str(path), str(out / "pan_pred"), str(out / "overlays")])


def _video_panoptic(spec: TaskSpec, model: OMGSeg, vocab: Vocabulary, frames: list[Path], request: PredictRequest,
                    overlay_per_video: bool) -> list[dict]:
    """One video's frames: per-clip panoptic fusion of tubes; thing ids follow the linked tracks
    across clips, stuff ids follow the class. Writes its PNGs; returns its frame annotations."""
    from PIL import Image

    from omgseg.datasets.clip import encode_id_map_rgb

    out, clip_length = request.out, request.clip_length
    linker = TubeLinker()
    video = frames[0].parent.name
    # A segment id names one tube with one category: a track whose class changes between
    # clips gets a new id for the new class.
    thing_ids: dict[tuple[int, int], int] = {}
    annotations = []
    for start in tqdm(range(0, len(frames), clip_length), desc=f"predict {spec.name} {video}",
                      disable=not request.progress):
        clip = [_read_rgb(p) for p in frames[start:start + clip_length]]
        (pred,) = model.predict(_frames_tensor(clip), vocab)
        tracks = linker.link(pred.embeddings).tolist()
        result = spec.postprocess(model, pred, vocab)
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
