"""A labelled val split cut from a train split: for a data set whose public val split has no
annotations (YouTube-VIS 2019 and 2021, a user's own data), a deterministic part of its train
images or videos is converted as its val split instead, and left out of its train shards.

The part is chosen by id, never by clip: every clip of a held-out video is in val, none in
train. Each id is ranked by the sha256 of its text, so the same ids always give the same part
whatever order the source lists them in, and adding videos to a source moves few of the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class HeldOut:
    """How much of a train split is held out: a `fraction` of its images or videos (at least
    one), or a `count` of them. Exactly one is given."""

    fraction: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ValueError(f"give a fraction or a count of items to hold out, not {self.describe()}")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"the held-out fraction must be between 0 and 1, got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"the held-out count must be at least 1, got {self.count}")

    def describe(self) -> str:
        return f"fraction {self.fraction}" if self.count is None else f"count {self.count}"

    def select(self, items: Sequence[str], where: str) -> tuple[str, ...]:
        """The held-out ids among `items` (a split's image or video ids), in their order.
        Raises naming `where` when nothing would be left for one side."""
        unique = list(dict.fromkeys(items))
        wanted = self.count if self.count is not None else max(1, round(self.fraction * len(unique)))
        if wanted >= len(unique):
            raise ValueError(f"{where}: holding out {self.describe()} of its {len(unique)} images or videos leaves "
                             "none to train on")
        ranked = sorted(unique, key=lambda item: hashlib.sha256(item.encode("utf-8")).hexdigest())
        chosen = set(ranked[:wanted])
        return tuple(item for item in unique if item in chosen)

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "count": self.count}

    @classmethod
    def from_json(cls, obj: object, where: str) -> HeldOut:
        if not isinstance(obj, dict) or set(obj) != {"fraction", "count"}:
            raise ValueError(f"{where}: expected {{'fraction', 'count'}}, got {obj!r}")
        try:
            return cls(obj["fraction"], obj["count"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class HeldOutSplit:
    """What a shard folder made with a held-out part holds, as its manifest records it.

    rule: how much was held out; side: "val" (this folder holds the held-out items) or
    "train" (it holds every other item of the train split); items: the held-out ids (both
    sides list them, so either folder says what training never saw).
    """

    rule: HeldOut
    side: Literal["train", "val"]
    items: tuple[str, ...]

    def to_json(self) -> dict:
        return {"rule": self.rule.to_json(), "side": self.side, "items": list(self.items)}

    @classmethod
    def from_json(cls, obj: object, where: str) -> HeldOutSplit:
        if not isinstance(obj, dict) or set(obj) != {"rule", "side", "items"}:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{where}: expected the fields ['items', 'rule', 'side'], got {got}")
        if obj["side"] not in ("train", "val") or not isinstance(obj["items"], list):
            raise ValueError(f"{where}: 'side' must be train or val and 'items' a list, got {obj['side']!r} and "
                             f"{type(obj['items']).__name__}")
        return cls(HeldOut.from_json(obj["rule"], f"{where}.rule"), obj["side"], tuple(str(i) for i in obj["items"]))
