"""Readers of the public dataset formats, registered by their command-line name.

Each module reads one layout of docs/datasets.md into `Clip` objects; `get_format` is how the
converter and configs find one by name.
"""

from __future__ import annotations

from omgseg.datasets.formats import ade_panoptic, coco_instances, coco_panoptic, davis, vipseg, ytvis
from omgseg.datasets.formats.base import SourceFormat


def _registry(*formats: SourceFormat) -> dict[str, SourceFormat]:
    out: dict[str, SourceFormat] = {}
    for fmt in formats:
        if fmt.name in out:
            raise ValueError(f"format name {fmt.name!r} is registered twice")
        out[fmt.name] = fmt
    return out


FORMATS: dict[str, SourceFormat] = _registry(
    coco_panoptic.FORMAT,
    coco_instances.FORMAT,
    ade_panoptic.FORMAT,
    vipseg.FORMAT,
    ytvis.FORMAT,
    davis.FORMAT,
)


def get_format(name: str) -> SourceFormat:
    """The reader registered as `name` ("coco-panoptic", ...); unknown names list the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise ValueError(f"unknown dataset format {name!r}; known formats: {known}") from None


__all__ = ["FORMATS", "SourceFormat", "get_format"]
