"""Helpers the format readers share: file access with errors that name the file, id maps to
segments, and cutting videos into clips.

Every error raised here is a ValueError (or FileNotFoundError for a split's own index file)
whose message names the file or the item being read, so a broken data set points at itself.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip, Segment
from omgseg.datasets.formats.base import ClipRef

# Ids live in 24-bit RGB id maps once written to shards (docs/datasets.md).
MAX_SEGMENT_ID = 256**3 - 1
# Polygon points further out than this many image sizes are errors (`check_segmentation`).
POLYGON_MARGIN = 4

Index = TypeVar("Index")
V = TypeVar("V")

_IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def load_json(path: Path) -> object:
    """The parsed JSON file; a missing or malformed file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


@contextmanager
def field_errors(where: str, name_values: bool = True) -> Iterator[None]:
    """Inside: a field of the wrong type or shape (`int(None)`, a number where a list belongs,
    a list as a dict key) raises a ValueError naming `where` instead of a bare TypeError.

    The readers check the fields they need by name (`require`); what a field holds is checked
    by using it, and this gives those failures the file and item they came from. A ValueError
    that does not mention `where` (`int("x")`) gets it in front, unless `name_values` is False
    (the caller's own ValueErrors name their file already).
    """
    try:
        yield
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as err:
        raise ValueError(f"{where}: a field has the wrong type or shape ({type(err).__name__}: {err})") from None
    except ValueError as err:
        if where in str(err) or not name_values:
            raise
        raise ValueError(f"{where}: {err}") from None


def file_identity(path: Path) -> tuple[Path, int, int]:
    """(path, mtime, size): the key readers cache a parsed index file under.

    The converter asks for categories, count and clips separately, and COCO's train JSONs
    are large enough that parsing them three times shows; the key changes when the file does.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


def cached_index(parse: Callable[[Path], Index]) -> Callable[[Path], Index]:
    """`parse(json_path)` run once per version of the file (see file_identity), its errors
    naming the file and the field."""

    @functools.lru_cache(maxsize=1)
    def load(json_path: Path, mtime_ns: int, size: int) -> Index:
        with field_errors(str(json_path)):
            return parse(json_path)

    def index(json_path: Path) -> Index:
        return load(*file_identity(json_path))

    return index


def thing_categories(entries: Sequence[object], where: str) -> dict[int, Category]:
    """A COCO-style `categories` list of things only (instances, YouTube-VIS), by id."""
    categories: dict[int, Category] = {}
    for k, c in enumerate(entries):
        require(c, ("id", "name"), f"{where}: categories[{k}]")
        if int(c["id"]) in categories:
            raise ValueError(f"{where}: category id {c['id']} is listed twice")
        categories[int(c["id"])] = Category(id=int(c["id"]), name=str(c["name"]), isthing=True)
    return categories


def records_by_id(entries: Sequence[object], fields: Sequence[str], where: str, kind: str) -> dict[object, dict]:
    """The `kind` records of a JSON list (images, videos) by their id, each with `fields`."""
    records: dict[object, dict] = {}
    for k, record in enumerate(entries):
        require(record, fields, f"{where}: {kind}s[{k}]")
        if record["id"] in records:
            raise ValueError(f"{where}: {kind} id {record['id']} is listed twice")
        records[record["id"]] = record
    return records


def annotations_by_record(
    annotations: Sequence[object],
    records: Mapping[object, dict],
    categories: Mapping[int, Category],
    *,
    record_field: str,
    mask_field: str,
    kind: str,
    where: str,
) -> dict[object, list[dict]]:
    """{record id: its annotations} for the records (images or videos) of an instances-style
    JSON, each list in annotation-id order, every record present. `record_field` is the
    annotation's field holding its record's id ("image_id"), `mask_field` the one holding its
    masks. An annotation lacking a field, naming a record or a category that does not exist,
    or repeating an annotation id is an error naming it."""
    fields = ("id", record_field, "category_id", mask_field)
    grouped: dict[object, list[dict]] = {r: [] for r in records}
    seen: set[int] = set()
    for k, ann in enumerate(annotations):
        require(ann, fields, f"{where}: annotations[{k}]")
        record = records.get(ann[record_field])
        if record is None:
            raise ValueError(f"{where}: annotation {ann['id']} refers to unknown {kind} id {ann[record_field]}")
        if int(ann["category_id"]) not in categories:
            name = f" ({record['file_name']})" if "file_name" in record else ""
            raise ValueError(
                f"{where}: {kind} {record['id']}{name} annotation {ann['id']} has unknown category id {ann['category_id']}"
            )
        if int(ann["id"]) in seen:
            raise ValueError(f"{where}: annotation id {ann['id']} is listed twice")
        seen.add(int(ann["id"]))
        grouped[ann[record_field]].append(ann)
    for anns in grouped.values():
        anns.sort(key=lambda a: int(a["id"]))
    return grouped


def read_name_list(path: Path) -> list[str]:
    """Names listed one a line (DAVIS ImageSets, VIPSeg train.txt), blank lines skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"split list {path} names no videos")
    return names


def require(obj: object, fields: Sequence[str], where: str) -> None:
    """Raise naming `where` and the first of `fields` that the JSON object `obj` lacks."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in fields:
        if key not in obj:
            raise ValueError(f"{where}: missing required field {key!r}")


def image_ext(path: Path) -> str:
    """The encoding, "jpg" or "png", from a frame file's suffix (the encoding the bytes are kept in)."""
    ext = _IMAGE_EXTS.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"{path}: unsupported image type {path.suffix!r}; expected .jpg or .png")
    return ext


def read_image(path: Path, where: str) -> tuple[bytes, tuple[int, int]]:
    """The file's original bytes and its (height, width).

    The shards keep the original bytes, but the image is decoded once here: a truncated or
    corrupt JPEG whose header still reads would otherwise be accepted now and fail only when
    training decodes it, possibly hours into a run.
    """
    if not path.is_file():
        raise ValueError(f"{where}: image file {path} does not exist")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: cannot read image {path}: {err}") from None
    return data, (height, width)


def read_frames(paths: Sequence[Path], where: str) -> tuple[list[bytes], list[tuple[int, int]], str]:
    """The original bytes and (height, width) of a clip's frames, and their shared encoding."""
    exts = {image_ext(p) for p in paths}
    if len(exts) != 1:
        raise ValueError(f"{where}: frames mix image types {sorted(exts)} ({paths[0]} ...)")
    images, sizes = [], []
    for p in paths:
        data, size = read_image(p, where)
        images.append(data)
        sizes.append(size)
    return images, sizes, exts.pop()


def read_png(path: Path, where: str) -> tuple[np.ndarray, str]:
    """The decoded pixels of a PNG as numpy (H, W) or (H, W, C), and the PIL mode.

    Decoding is forced here so that a truncated or corrupt file fails with its name instead
    of later, inside numpy.
    """
    if not path.is_file():
        raise ValueError(f"{where}: PNG file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im), im.mode
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: cannot read PNG {path}: {err}") from None


def check_size(
    found: tuple[int, int],
    expected: tuple[int, int],
    path: Path,
    where: str,
    reference: str = "the annotation says",
) -> None:
    """Raise if a file's (height, width) differs from the expected one (`reference` says
    where that came from)."""
    if tuple(found) != tuple(expected):
        raise ValueError(
            f"{where}: {path} is {found[0]}x{found[1]} (HxW) but {reference} {expected[0]}x{expected[1]}"
        )


def sort_key(value: object) -> tuple[int, object]:
    """Orders ids numerically when they are numbers (COCO) and by text otherwise (ADE's
    string image ids), so mixed id types never make sorting fail."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def by_text_id(records: Mapping[object, V], where: str, kind: str) -> dict[str, V]:
    """`records` ({id: record}) in id order (`sort_key`), keyed by the id as text: how a
    `ClipRef` names its image or video. Two ids of one text (1 and "1") are an error."""
    out: dict[str, V] = {}
    for key in sorted(records, key=sort_key):
        if str(key) in out:
            raise ValueError(f"{where}: {kind} ids {key!r} and {str(key)!r} are the same as text")
        out[str(key)] = records[key]
    return out


# Below this largest id, counting with bincount (a table of that many ints) beats sorting.
_BINCOUNT_LIMIT = 1 << 20


def id_counts(frame: np.ndarray) -> dict[int, int]:
    """{id: pixel count} of every non-zero id in one non-negative integer map (H, W).

    Small id ranges (VIPSeg, DAVIS, instance ids) are counted with bincount, about ten times
    faster than np.unique's sort on a 720p frame; large ones (COCO RGB ids) fall back to it.
    """
    if frame.size == 0:
        return {}
    top = int(frame.max())
    if top < _BINCOUNT_LIMIT:
        table = np.bincount(frame.ravel())
        values = np.flatnonzero(table)
        counts = table[values]
    else:
        values, counts = np.unique(frame, return_counts=True)
    return {v: c for v, c in zip(values.tolist(), counts.tolist(), strict=True) if v != 0}


def frame_areas(id_maps: np.ndarray) -> dict[int, list[int]]:
    """Per-frame pixel counts of every non-zero id present in `id_maps` (T, H, W)."""
    areas: dict[int, list[int]] = {}
    num_frames = id_maps.shape[0]
    for t in range(num_frames):
        for v, c in id_counts(id_maps[t]).items():
            areas.setdefault(v, [0] * num_frames)[t] = c
    return areas


def assign_segment_ids(annotation_ids: Sequence[int]) -> dict[int, int]:
    """Annotation id -> id usable in an id map.

    Annotation ids are kept when all of them fit the 24-bit map encoding (and none is 0,
    which means void); otherwise all are renumbered 1..N in annotation-id order. COCO's crowd
    annotations (ids around 9e11) are the usual reason.
    """
    ids = sorted({int(i) for i in annotation_ids})
    if all(0 < i <= MAX_SEGMENT_ID for i in ids):
        return {i: i for i in ids}
    return {a: k + 1 for k, a in enumerate(ids)}


def clip_ranges(num_frames: int, clip_length: int | None) -> list[tuple[int, int]]:
    """Consecutive [start, stop) frame ranges of `clip_length` (the last may be shorter)."""
    if clip_length is None:
        return [(0, num_frames)]
    if clip_length < 1:
        raise ValueError(f"clip_length must be at least 1, got {clip_length}")
    return [(s, min(s + clip_length, num_frames)) for s in range(0, num_frames, clip_length)]


def clip_source_id(video: str, start: int, clip_length: int | None) -> str:
    """The video's own id when kept whole, "<video>@<start frame>" when cut into clips."""
    return video if clip_length is None else f"{video}@{start}"


def build_clip(
    *,
    dataset: str,
    source_id: str,
    frame_names: Sequence[str],
    images: list[bytes],
    ext: str,
    id_maps: np.ndarray,
    info: Mapping[int, tuple[int, bool, int]],
    tasks: tuple[Task, ...],
    extra: dict | None = None,
    areas: Mapping[int, Sequence[int]] | None = None,
) -> Clip:
    """A Clip whose segments are the ids present in `id_maps` (T, H, W) uint32.

    info: segment id -> (category id, iscrowd, track id); every non-zero id in the maps must
    be a key (the readers check that, with file names, before calling). Segments listed in
    `info` but absent from every frame are left out; areas are counted from the maps unless
    the caller already has them (`frame_areas(id_maps)`).
    """
    if areas is None:
        areas = frame_areas(id_maps)
    segments = [
        Segment(id=i, category_id=info[i][0], iscrowd=info[i][1], track_id=info[i][2], area=tuple(areas[i]))
        for i in sorted(areas)
    ]
    return Clip(
        dataset=dataset,
        source_id=source_id,
        frame_names=tuple(frame_names),
        images=images,
        image_ext=ext,
        id_maps=id_maps,
        segments=segments,
        tasks=tasks,
        extra=extra or {},
    )


def frame_files(folder: Path, suffixes: tuple[str, ...], where: str) -> list[Path]:
    """The files of one video folder with the given suffixes, in file-name order."""
    if not folder.is_dir():
        raise ValueError(f"{where}: frame folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"{where}: frame folder {folder} has no {'/'.join(suffixes)} files")
    return files


# (decoded PNG pixels, PIL mode, PNG path, where) -> (uint32 id map (H, W), segment info of
# its ids as build_clip takes it).
MaskDecoder = Callable[[np.ndarray, str, Path, str], tuple[np.ndarray, dict[int, tuple[int, bool, int]]]]


def video_frames(image_dir: Path, video: str, listed_in: Path) -> list[Path]:
    """The frames of a video stored as a folder of images (DAVIS, VIPSeg): its .jpg/.png
    files in file-name order. `listed_in`: the split list that named the video, for the error
    when its folder is missing."""
    return frame_files(image_dir / video, (".jpg", ".jpeg", ".png"), f"video {video} (listed in {listed_in})")


def video_folder_plan(videos: Sequence[str], image_dir: Path, listed_in: Path, clip_length: int | None) -> list[ClipRef]:
    """The clips of videos stored as folders of frames, from the folder listings alone."""
    clip_ranges(1, clip_length)  # reject a bad clip_length before reading anything
    return [ClipRef(video, start, stop) for video in videos
            for start, stop in clip_ranges(len(video_frames(image_dir, video, listed_in)), clip_length)]


def mask_video_clips(
    *,
    dataset: str,
    tasks: tuple[Task, ...],
    refs: Sequence[ClipRef],
    image_dir: Path,
    mask_dir: Path,
    clip_length: int | None,
    decode: MaskDecoder,
    listed_in: Path,
) -> Iterator[Clip]:
    """The clips `refs` name, of videos stored as a folder of frames plus a folder of one PNG
    per frame.

    Frame `<stem>.jpg` of a video has its mask at `mask_dir/<video>/<stem>.png` (DAVIS and
    VIPSeg). Frame names are "<video>/<file>". Only the frames of the current clip are held in
    memory.
    """
    for video, video_refs in itertools.groupby(refs, key=lambda r: r.item):
        frames = video_frames(image_dir, video, listed_in)
        for ref in video_refs:
            paths = frames[ref.start:ref.stop]
            where = f"video {video} ({paths[0].name})"
            with field_errors(where):
                clip = _mask_clip(dataset, tasks, video, paths, mask_dir, clip_length, ref.start, where, decode)
            yield clip


def _mask_clip(dataset: str, tasks: tuple[Task, ...], video: str, paths: Sequence[Path], mask_dir: Path,
               clip_length: int | None, start: int, where: str, decode: MaskDecoder) -> Clip:
    """One clip of `mask_video_clips`: frames `paths` and their masks."""
    images, sizes, ext = read_frames(paths, where)
    id_maps = np.zeros((len(paths), *sizes[0]), dtype=np.uint32)
    info: dict[int, tuple[int, bool, int]] = {}
    for t, (path, size) in enumerate(zip(paths, sizes, strict=True)):
        mask_path = mask_dir / video / f"{path.stem}.png"
        frame_where = f"video {video} frame {path.name}"
        pixels, mode = read_png(mask_path, frame_where)
        check_size(size, sizes[0], path, frame_where, f"the clip's first frame {paths[0].name} is")
        check_size(pixels.shape[:2], size, mask_path, frame_where, f"its frame {path.name} is")
        id_maps[t], frame_info = decode(pixels, mode, mask_path, frame_where)
        info.update(frame_info)
    return build_clip(
        dataset=dataset,
        source_id=clip_source_id(video, start, clip_length),
        frame_names=[f"{video}/{p.name}" for p in paths],
        images=images,
        ext=ext,
        id_maps=id_maps,
        info=info,
        tasks=tasks,
    )


def _compressed_counts(counts: str, where: str) -> list[int]:
    """The runs of a COCO compressed RLE string (pycocotools' rleFrString, which reads past the
    end of a malformed string instead of failing)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError(f"{where}: compressed RLE counts end in the middle of a run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"{where}: compressed RLE counts hold an invalid character {counts[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def check_segmentation(segm: object, height: int, width: int, where: str) -> None:
    """Raise naming `where` unless `segm` is polygons near an (height, width) image or an RLE
    of such a mask whose runs cover it exactly: pycocotools writes past the mask, never
    returns, or crashes otherwise (seen with a dropped run and a coordinate of 2**40)."""
    if isinstance(segm, list):
        if not all(isinstance(p, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
                   for p in segm):
            raise ValueError(f"{where}: polygons must be lists of numbers")
        # pycocotools reads a list by its first polygon: 4 numbers make it a box (a COCO encoding), fewer an
        # unsupported input; an odd count has no last y.
        if not segm or len(segm[0]) < 4 or any(len(p) % 2 for p in segm):
            raise ValueError(f"{where}: polygons need an even number of coordinates, the first at least 4 "
                             f"(got lengths {[len(p) for p in segm]})")
        # Points may lie outside the image (pycocotools clips them), but not far outside:
        # pycocotools allocates along every edge, so one huge or non-finite coordinate
        # exhausts memory or crashes the process.
        bound = POLYGON_MARGIN * max(height, width, 1)
        for p in segm:
            for v in p:
                if not -bound <= v <= bound:
                    raise ValueError(f"{where}: polygon coordinate {v} is far outside the {height}x{width} image")
        return
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"{where}: segmentation must be polygons or an RLE dict with 'counts' and 'size', "
                         f"got {type(segm).__name__}")
    if segm["size"] != [height, width]:
        raise ValueError(f"{where}: RLE size {segm['size']!r} differs from the image's [{height}, {width}]")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError(f"{where}: uncompressed RLE counts must be integers")
        runs = counts
    elif isinstance(counts, str):
        runs = _compressed_counts(counts, where)
    else:
        raise ValueError(f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}")
    if any(c < 0 for c in runs) or sum(runs) != height * width:
        kind = "uncompressed" if isinstance(counts, list) else "compressed"
        raise ValueError(f"{where}: {kind} RLE runs sum to {sum(runs)}, expected {height * width}")
