"""Vocabularies, the cached CLIP text classifier, and the data-to-model target glue."""

import pytest
import torch

from omgseg.core.structures import Category, PromptKind
from omgseg.datasets.prompts import Prompts
from omgseg.datasets.transforms import Targets
from omgseg.model.backbone import build_backbone
from omgseg.model.clip_model import TINY_MODEL_NAME
from omgseg.model.structures import POINT_BOX_HALF_SIZE
from omgseg.model.vocabulary import PROMPT_TEMPLATES, TextClassifier, Vocabulary, merge_vocabularies
from omgseg.platform.training.targets import match_targets, prompt_batch

CATEGORIES = [Category(3, "person", True, ("human", "person")), Category(9, "sky", False)]


def test_from_categories_keeps_ids_things_and_deduplicated_synonyms():
    vocab = Vocabulary.from_categories(CATEGORIES)
    assert vocab.names == ("person, human", "sky")
    assert vocab.synonyms(0) == ["person", "human"]
    assert vocab.is_thing == (True, False) and vocab.category_ids == (3, 9)
    assert vocab.label_map() == {3: 0, 9: 1}
    assert vocab.seen_mask({"Human"}).tolist() == [True, False]


def test_bad_vocabularies_are_refused():
    with pytest.raises(ValueError, match="at least one class"):
        Vocabulary((), (), ())
    with pytest.raises(ValueError, match="2 names but 1 is_thing"):
        Vocabulary(("a", "b"), (True,), (1, 2))
    with pytest.raises(ValueError, match=r"classes \[1\] have empty names"):
        Vocabulary(("a", " , "), (True, True), (1, 2))
    with pytest.raises(ValueError, match="category ids repeat"):
        Vocabulary(("a", "b"), (True, True), (1, 1))


def test_text_classifier_averages_templates_pads_synonyms_and_caches():
    backbone = build_backbone(TINY_MODEL_NAME)
    calls = []

    def encode(tokens):
        calls.append(tokens.shape[0])
        return backbone.encode_text(tokens)

    classifier = TextClassifier(backbone.tokenize, encode)
    vocab = Vocabulary.from_categories(CATEGORIES)
    table = classifier.embeddings(vocab)
    assert table.shape == (2, 2, backbone.embed_dim)
    assert calls == [3 * len(PROMPT_TEMPLATES)]  # 3 synonyms, every template, one batch
    # A synonym's row is the normalised mean of its templates' embeddings.
    sky = backbone.encode_text(backbone.tokenize([t.format("sky") for t in PROMPT_TEMPLATES]))
    assert torch.allclose(table[1, 0], torch.nn.functional.normalize(sky.mean(0), dim=0), atol=1e-5)
    assert torch.equal(table[1, 1], table[1, 0])  # padding repeats the first synonym
    assert classifier.embeddings(vocab) is table and len(calls) == 1  # cached
    with pytest.raises(ValueError, match="needs a '{}'"):
        TextClassifier(backbone.tokenize, encode, templates=("a photo",))


def _targets() -> Targets:
    masks = torch.zeros(3, 2, 8, 8, dtype=torch.bool)
    masks[0, :, :4] = True
    masks[1, :, 4:] = True
    masks[2, 0, 0, 0] = True
    return Targets(
        masks=masks, labels=torch.tensor([3, 9, 3]), track_ids=torch.tensor([10, 11, 12]),
        segment_ids=torch.tensor([1, 2, 3]), iscrowd=torch.tensor([False, False, True]),
        valid=masks.flatten(2).any(-1),
    )


def test_match_targets_drops_crowds_maps_labels_and_takes_prompt_tubes():
    vocab = Vocabulary.from_categories(CATEGORIES)
    point = Prompts(PromptKind.POINT, 1, torch.tensor([[2.5, 5.5], [1.5, 1.5]]), torch.tensor([1, 0]), torch.zeros(0, 4))
    box = Prompts(PromptKind.BOX, 0, torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), torch.tensor([[0.0, 0.0, 8.0, 4.0]]))
    out = match_targets(_targets(), vocab.label_map(), [point, box])
    assert out.labels.tolist() == [0, 1] and out.track_ids.tolist() == [10, 11]
    assert torch.equal(out.prompt_masks, _targets().masks[[1, 0]])

    batch = prompt_batch([point, box], (8, 8))
    r = POINT_BOX_HALF_SIZE
    assert batch.boxes[0].tolist() == [0.0, 5.5 - r, 2.5 + r, 8.0]  # clipped to the image
    assert batch.boxes[1].tolist() == [0.0, 0.0, 8.0, 4.0]
    assert batch.kinds == (PromptKind.POINT, PromptKind.BOX)
    assert batch.click_labels.tolist() == [[0], [-1]]  # a negative click, then padding
    assert batch.clicks[0, 0].tolist() == [1.5, 1.5]
    assert prompt_batch([], (8, 8)).num_prompts == 0


def test_prompt_glue_errors_name_the_problem():
    vocab = Vocabulary.from_categories(CATEGORIES)
    two = Prompts(PromptKind.POINT, 0, torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([1, 1]), torch.zeros(0, 4))
    batch = prompt_batch([two], (8, 8))  # the second positive click is kept as a click
    assert batch.clicks[0].tolist() == [[2.0, 2.0]] and batch.click_labels.tolist() == [[1]]
    none = Prompts(PromptKind.POINT, 0, torch.tensor([[1.0, 1.0]]), torch.tensor([0]), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="has no positive click"):
        prompt_batch([none], (8, 8))
    far = Prompts(PromptKind.POINT, 7, torch.tensor([[1.0, 1.0]]), torch.tensor([1]), torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"prompt segment indices \[7\] out of range for 3 segments"):
        match_targets(_targets(), vocab.label_map(), [far])
    with pytest.raises(KeyError, match=r"category ids \[3\] are not in the vocabulary \(known: \[9\]\)"):
        match_targets(_targets(), {9: 0})


def test_merge_joins_classes_that_share_a_synonym():
    coco = Vocabulary.from_categories([Category(1, "person", True), Category(2, "sky", False)])
    vip = Vocabulary.from_categories([Category(5, "human", True, ("person",)), Category(6, "tree", False)])
    ade = Vocabulary.from_categories([Category(10, "Sky", False), Category(11, "ring", False)])
    merged, maps = merge_vocabularies({"coco": coco, "vipseg": vip, "ade": ade})
    assert merged.names == ("person, human", "sky", "tree", "ring")
    assert merged.category_ids == (1, 2, 3, 4) and merged.is_thing == (True, False, False, False)
    assert maps == {"coco": {1: 0, 2: 1}, "vipseg": {5: 0, 6: 2}, "ade": {10: 1, 11: 3}}
