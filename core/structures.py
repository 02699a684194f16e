"""The names every package shares, so that the data and the model need not import each other:
what a task is, what a category is, how a prompt points at an object."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Task(str, enum.Enum):
    """A segmentation task a dataset can supervise or be evaluated on."""

    PANOPTIC = "panoptic"
    INSTANCE = "instance"
    SEMANTIC = "semantic"
    VIDEO_PANOPTIC = "video_panoptic"
    VIDEO_INSTANCE = "video_instance"
    VOS = "vos"
    INTERACTIVE = "interactive"

    @classmethod
    def parse(cls, value: str) -> Task:
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown task {value!r}; known tasks: {known}") from None


@dataclass(frozen=True)
class Category:
    """One entry of a dataset's vocabulary (its own ids, as in the source)."""

    id: int
    name: str
    isthing: bool
    synonyms: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out = {"id": self.id, "name": self.name, "isthing": int(self.isthing)}
        if self.synonyms:
            out["synonyms"] = list(self.synonyms)
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str) -> Category:
        for key in ("id", "name", "isthing"):
            if key not in obj:
                raise ValueError(f"{where}: category {obj!r} has no {key!r} field")
        return cls(
            id=int(obj["id"]),
            name=str(obj["name"]),
            isthing=bool(obj["isthing"]),
            synonyms=tuple(obj.get("synonyms", ())),
        )


class PromptKind(str, enum.Enum):
    """How the user points at the object: clicks or a box."""

    POINT = "point"
    BOX = "box"
