"""The one sample structure every dataset is read into: a clip of T frames.

An image dataset gives clips with T = 1. A clip carries the encoded frame images exactly as
the source stored them (JPEG bytes are never re-encoded), one segment-id map per frame, and
the list of segments those maps refer to. See docs/datasets.md for the on-disk schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omgseg.core.structures import Category, Task  # noqa: F401 - part of this module's schema


@dataclass(frozen=True)
class Segment:
    """One segment (a thing instance, a stuff region or a crowd region) of a clip.

    `id` is the value the segment has in the clip's id maps; `track_id` is stable across the
    clip's frames (equal to `id` for images); `area[t]` is its pixel count in frame t
    (0 where the object is absent from that frame).
    """

    id: int
    category_id: int
    iscrowd: bool
    track_id: int
    area: tuple[int, ...]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "category_id": self.category_id,
            "iscrowd": int(self.iscrowd),
            "track_id": self.track_id,
            "area": list(self.area),
        }

    @classmethod
    def from_json(cls, obj: dict, where: str) -> Segment:
        for key in ("id", "category_id", "iscrowd", "track_id", "area"):
            if key not in obj:
                raise ValueError(f"{where}: segment {obj.get('id', '?')} has no {key!r} field")
        return cls(
            id=int(obj["id"]),
            category_id=int(obj["category_id"]),
            iscrowd=bool(obj["iscrowd"]),
            track_id=int(obj["track_id"]),
            area=tuple(int(a) for a in obj["area"]),
        )


@dataclass
class Clip:
    """T frames with their segment-id maps and segments, validated when built.

    source_id: the source's own id of the image or video (COCO image id, video name).
    frame_names: T source file names of the frames, relative to the source's image folder,
        so that predictions can be written under the names the ground truth uses.
    images: T encoded image files (bytes), in the source's own encoding.
    image_ext: "jpg" or "png", the encoding of `images`.
    id_maps: uint32 array (T, H, W); 0 is void/unlabelled, other values are `Segment.id`.
    extra: format-specific provenance stored verbatim (e.g. `overlap_pixels` where a format
        allows overlapping masks that one id map cannot hold).
    """

    dataset: str
    source_id: str
    frame_names: tuple[str, ...]
    images: list[bytes]
    image_ext: str
    id_maps: np.ndarray
    segments: list[Segment]
    tasks: tuple[Task, ...]
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"clip {self.source_id!r} of {self.dataset!r}"
        if self.image_ext not in ("jpg", "png"):
            raise ValueError(f"{where}: image_ext must be 'jpg' or 'png', got {self.image_ext!r}")
        if self.id_maps.ndim != 3:
            raise ValueError(f"{where}: id_maps must be (T, H, W), got shape {self.id_maps.shape}")
        if self.id_maps.dtype != np.uint32:
            raise ValueError(f"{where}: id_maps must be uint32, got {self.id_maps.dtype}")
        if len(self.frame_names) != self.id_maps.shape[0]:
            raise ValueError(
                f"{where}: {len(self.frame_names)} frame names but {self.id_maps.shape[0]} id maps"
            )
        if len(self.images) != self.id_maps.shape[0]:
            raise ValueError(
                f"{where}: {len(self.images)} images but {self.id_maps.shape[0]} id maps"
            )
        ids = [s.id for s in self.segments]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: duplicate segment ids {sorted(ids)}")
        if 0 in ids:
            raise ValueError(f"{where}: segment id 0 is reserved for void")
        for s in self.segments:
            if len(s.area) != self.num_frames:
                raise ValueError(
                    f"{where}: segment {s.id} has {len(s.area)} areas for {self.num_frames} frames"
                )
        present = set(np.unique(self.id_maps).tolist()) - {0}
        missing = present - set(ids)
        if missing:
            raise ValueError(f"{where}: ids {sorted(missing)} are in the id maps but not in segments")

    @property
    def num_frames(self) -> int:
        return int(self.id_maps.shape[0])

    @property
    def height(self) -> int:
        return int(self.id_maps.shape[1])

    @property
    def width(self) -> int:
        return int(self.id_maps.shape[2])

    def header(self) -> dict:
        """The JSON record stored as `<key>.json` in a shard."""
        return {
            "dataset": self.dataset,
            "source_id": self.source_id,
            "frames": self.num_frames,
            "frame_names": list(self.frame_names),
            "height": self.height,
            "width": self.width,
            "tasks": [t.value for t in self.tasks],
            "segments": [s.to_json() for s in self.segments],
            **({"extra": self.extra} if self.extra else {}),
        }


def segment_areas(id_maps: np.ndarray, segment_ids: list[int]) -> dict[int, tuple[int, ...]]:
    """Per-frame pixel counts of each id in `id_maps` (T, H, W)."""
    out: dict[int, list[int]] = {i: [0] * id_maps.shape[0] for i in segment_ids}
    for t in range(id_maps.shape[0]):
        values, counts = np.unique(id_maps[t], return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v in out:
                out[v][t] = int(c)
    return {i: tuple(a) for i, a in out.items()}


def encode_id_map_rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) integer ids -> (H, W, 3) uint8, COCO panoptic encoding id = R + 256 G + 256^2 B."""
    if id_map.max(initial=0) >= 256**3:
        raise ValueError(f"segment id {int(id_map.max())} does not fit the 24-bit RGB encoding")
    ids = id_map.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def decode_id_map_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic encoding -> (H, W) uint32 ids."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
