"""Vocabularies and the CLIP text classifier built from them.

A vocabulary is an input of the model, not part of its weights: class logits are cosine
similarities between query embeddings and CLIP text embeddings of the class names, so any
list of names works at inference time. Each name may hold synonyms separated by commas
("person, child, man"); a class's logit is the best of its synonyms. Each synonym is
embedded with a set of prompt templates, averaged (ViLD's prompt ensembling).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from omgseg.core.structures import Category

# Prompt templates for class names: a photo-style context helps CLIP's text tower, and
# averaging over several removes the quirks of any single wording. Our own wording, in the
# spirit of ViLD's 14.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a photo of one {}.",
    "a good photo of a {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
)


@dataclass(frozen=True)
class Vocabulary:
    """The classes a prediction may take, in index order.

    names: one entry per class; commas separate synonyms ("couch, sofa").
    is_thing: per class, whether it is a countable object (instances) or stuff.
    category_ids: the data set's own id of each class, to write results back.
    """

    names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    category_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise ValueError("a vocabulary needs at least one class")
        if len(self.is_thing) != n or len(self.category_ids) != n:
            raise ValueError(
                f"vocabulary has {n} names but {len(self.is_thing)} is_thing flags and "
                f"{len(self.category_ids)} category ids"
            )
        empty = [i for i, name in enumerate(self.names) if not self.synonyms(i)]
        if empty:
            raise ValueError(f"vocabulary classes {empty} have empty names")
        if len(set(self.category_ids)) != n:
            raise ValueError(f"vocabulary category ids repeat: {list(self.category_ids)}")

    @classmethod
    def from_categories(cls, categories: Sequence[Category]) -> Vocabulary:
        """A data set's categories (as in its shards' meta.json), synonyms included."""
        names = []
        for c in categories:
            synonyms = [c.name, *c.synonyms]
            names.append(", ".join(dict.fromkeys(s.strip() for s in synonyms if s.strip())))
        return cls(
            names=tuple(names),
            is_thing=tuple(bool(c.isthing) for c in categories),
            category_ids=tuple(int(c.id) for c in categories),
        )

    @classmethod
    def from_names(cls, names: Sequence[str], is_thing: Sequence[bool] | None = None) -> Vocabulary:
        """An ad-hoc vocabulary (open-vocabulary use): all things unless told otherwise."""
        flags = tuple(True for _ in names) if is_thing is None else tuple(bool(x) for x in is_thing)
        return cls(names=tuple(names), is_thing=flags, category_ids=tuple(range(1, len(names) + 1)))

    def __len__(self) -> int:
        return len(self.names)

    def synonyms(self, index: int) -> list[str]:
        return [s.strip() for s in self.names[index].split(",") if s.strip()]

    def index_of(self, category_id: int) -> int:
        try:
            return self.category_ids.index(category_id)
        except ValueError:
            raise KeyError(f"category id {category_id} is not in the vocabulary {list(self.category_ids)}") from None

    def label_map(self) -> dict[int, int]:
        """{data set category id: class index}."""
        return {cid: i for i, cid in enumerate(self.category_ids)}

    def seen_mask(self, seen_names: set[str]) -> Tensor:
        """(C,) bool: which classes share a synonym with the names seen in training."""
        seen = {s.lower() for s in seen_names}
        return torch.tensor([any(s.lower() in seen for s in self.synonyms(i)) for i in range(len(self))])


class TextClassifier:
    """CLIP text embeddings of vocabularies, cached per vocabulary.

    `encode_text` maps tokenised texts to unit-norm embeddings (the frozen CLIP text tower);
    `tokenize` maps texts to tokens. The result of `embeddings` is (C, S, D): S synonyms per
    class, padded by repeating a class's first synonym so that a max over S is unaffected.
    The cache holds the last `cache_size` vocabularies (text towers are slow on CPU, and
    training asks for the same few vocabularies every step).
    """

    def __init__(self, tokenize, encode_text, templates: Sequence[str] = PROMPT_TEMPLATES,
                 cache_size: int = 16) -> None:
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"every prompt template needs a '{{}}' for the class name, got {list(templates)}")
        self.tokenize = tokenize
        self.encode_text = encode_text
        self.templates = tuple(templates)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, ...], Tensor] = OrderedDict()

    def embeddings(self, vocabulary: Vocabulary) -> Tensor:
        """(C, S, D), built outside inference mode (and without gradients), so that a table first
        built during `predict` serves a training step too."""
        key = vocabulary.names
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.inference_mode(False), torch.no_grad():
            table = self._build(vocabulary)
        self._cache[key] = table
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def _build(self, vocabulary: Vocabulary) -> Tensor:
        synonyms = [vocabulary.synonyms(i) for i in range(len(vocabulary))]
        flat = [s for group in synonyms for s in group]
        texts = [t.format(s) for s in flat for t in self.templates]
        encoded = self.encode_text(self.tokenize(texts))  # (N * templates, D), unit norm
        per_synonym = F.normalize(encoded.view(len(flat), len(self.templates), -1).mean(dim=1), dim=-1)
        width = max(len(g) for g in synonyms)
        rows, start = [], 0
        for group in synonyms:
            block = per_synonym[start:start + len(group)]
            start += len(group)
            pad = block[:1].expand(width - len(group), -1)
            rows.append(torch.cat([block, pad]))
        return torch.stack(rows)  # (C, S, D)


def merge_vocabularies(vocabularies: dict[str, Vocabulary]) -> tuple[Vocabulary, dict[str, dict[int, int]]]:
    """One vocabulary for co-training several data sets, and each data set's
    {category id: merged class index}.

    Classes that share a synonym (case-insensitive) become one class, as the reference merges
    COCO, VIPSeg and YouTube-VIS; its synonyms are the union, in first-seen order. Merged ids
    are 1..N. A class that is a thing in one data set and stuff in another keeps the first
    data set's flag (the training loss does not use it; evaluation uses each data set's own
    vocabulary).
    """
    synonyms: list[list[str]] = []
    is_thing: list[bool] = []
    where: dict[str, int] = {}  # lower-cased synonym -> merged index
    maps: dict[str, dict[int, int]] = {}
    for name, vocab in vocabularies.items():
        maps[name] = {}
        for i, cid in enumerate(vocab.category_ids):
            words = vocab.synonyms(i)
            hits = sorted({where[w.lower()] for w in words if w.lower() in where})
            if hits:
                index = hits[0]  # a class bridging two merged classes joins the first
            else:
                index = len(synonyms)
                synonyms.append([])
                is_thing.append(vocab.is_thing[i])
            for w in words:
                if w.lower() not in where:
                    where[w.lower()] = index
                    synonyms[index].append(w)
            maps[name][cid] = index
    merged = Vocabulary(
        names=tuple(", ".join(group) for group in synonyms),
        is_thing=tuple(is_thing),
        category_ids=tuple(range(1, len(synonyms) + 1)),
    )
    return merged, maps
