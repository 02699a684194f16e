"""Per-task post-processing on hand-built predictions whose answers are known."""

import math

import pytest
import torch

from omgseg.model.inference import (
    TubeLinker,
    ensemble_probs,
    instance_inference,
    panoptic_inference,
    prompt_inference,
    semantic_inference,
)

BIG = 20.0  # a mask logit that is certainly in (sigmoid ~ 1) or out


def _probs(rows: list[list[float]]) -> torch.Tensor:
    """Class probabilities; each row is completed with void so that it sums to 1."""
    p = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([p, 1 - p.sum(1, keepdim=True)], dim=1)


def _box_masks(boxes: list[tuple[int, int, int, int]], t: int = 1, size: int = 8) -> torch.Tensor:
    """(Q, T, size, size) logits: +BIG inside each box (r0, r1, c0, c1), -BIG outside."""
    m = torch.full((len(boxes), t, size, size), -BIG)
    for q, (r0, r1, c0, c1) in enumerate(boxes):
        m[q, :, r0:r1, c0:c1] = BIG
    return m


IS_THING = torch.tensor([True, True, False])  # classes 0, 1 things; 2 stuff


def test_panoptic_two_things_and_merged_stuff():
    probs = _probs([[0.9, 0.05, 0.0], [0.0, 0.95, 0.0], [0.0, 0.0, 0.9], [0.0, 0.0, 0.85]])
    masks = _box_masks([(0, 4, 0, 4), (4, 8, 4, 8), (0, 4, 4, 8), (4, 8, 0, 4)])
    result = panoptic_inference(probs, masks, IS_THING)
    assert [(s.id, s.label, s.isthing, s.query) for s in result.segments] == [
        (1, 0, True, 0), (2, 1, True, 1), (3, 2, False, 2)]
    expected = torch.zeros(1, 8, 8, dtype=torch.int64)
    expected[0, :4, :4] = 1
    expected[0, 4:, 4:] = 2
    expected[0, :4, 4:] = 3
    expected[0, 4:, :4] = 3  # the second 'stuff 2' query joins the first one's segment
    assert torch.equal(result.id_map, expected)
    assert result.segments[0].score == pytest.approx(0.9)


def test_panoptic_drops_low_scores_void_argmax_and_covered_queries():
    # q0 below the score threshold, q1 void is its argmax, q2 fine, q3 mostly under q2.
    probs = _probs([[0.7, 0.0, 0.0], [0.45, 0.0, 0.0], [0.95, 0.0, 0.0], [0.0, 0.9, 0.0]])
    masks = _box_masks([(0, 2, 0, 2), (2, 4, 0, 2), (0, 8, 0, 8), (0, 2, 0, 8)])
    masks[2, :, 0, 0:2] = -BIG  # q2 leaves 2 pixels to q3: q3 wins 2 of its 16 < 0.8
    result = panoptic_inference(probs, masks, IS_THING, object_mask_threshold=0.8)
    assert [s.query for s in result.segments] == [2]
    assert int((result.id_map == 0).sum()) == 2  # q3's lost pixels become void
    assert panoptic_inference(probs, masks, IS_THING, object_mask_threshold=0.99).segments == ()


def test_panoptic_video_ids_stay_over_frames():
    probs = _probs([[0.9, 0.0, 0.0], [0.0, 0.9, 0.0]])
    masks = _box_masks([(0, 4, 0, 8), (4, 8, 0, 8)], t=3)
    masks[1, 2] = -BIG  # object 2 is gone in the last frame
    result = panoptic_inference(probs, masks, IS_THING)
    assert result.id_map.shape == (3, 8, 8)
    assert [result.id_map[t, 0, 0].item() for t in range(3)] == [1, 1, 1]
    assert [result.id_map[t, 7, 0].item() for t in range(3)] == [2, 2, 0]


def test_instance_top_k_pairs_things_only_and_mask_scores():
    probs = _probs([[0.6, 0.3, 0.05], [0.1, 0.0, 0.8]])
    masks = _box_masks([(0, 4, 0, 4), (4, 8, 4, 8)])
    masks[1, 0, 4, 4] = 0.0  # one pixel at probability 0.5 is not in the mask (> 0.5)
    result = instance_inference(probs, masks, IS_THING, top_k=3)
    mask_prob = torch.sigmoid(torch.tensor(BIG)).item()
    # Pairs over thing classes only: (q0, 0) 0.6, (q0, 1) 0.3, (q1, 0) 0.1; stuff 0.8 ignored.
    assert result.queries.tolist() == [0, 0, 1] and result.labels.tolist() == [0, 1, 0]
    assert result.scores.tolist() == pytest.approx([0.6 * mask_prob, 0.3 * mask_prob, 0.1 * mask_prob], rel=1e-5)
    assert int(result.masks[2].sum()) == 15
    none = instance_inference(probs, masks, torch.tensor([False, False, False]))
    assert none.masks.shape == (0, 1, 8, 8)


def test_semantic_sums_class_times_mask():
    probs = _probs([[0.9, 0.0, 0.0], [0.0, 0.0, 0.6], [0.0, 0.0, 0.5]])
    masks = _box_masks([(0, 4, 0, 8), (0, 8, 0, 8), (0, 8, 0, 8)])
    result = semantic_inference(probs, masks)
    assert result.scores.shape == (3, 1, 8, 8)
    # Top half: class 0 scores 0.9, class 2 scores 1.1 (two queries); bottom: class 2 only.
    assert result.labels[0, 0, 0].item() == 2 and result.labels[0, 7, 0].item() == 2
    probs[0, 0] = 0.99
    probs[1, 2] = probs[2, 2] = 0.4
    assert semantic_inference(probs, masks).labels[0, 0, 0].item() == 0


def test_prompt_masks_and_scores():
    logits = torch.full((2, 2, 4, 4), -BIG)
    logits[0, :, :2] = math.log(0.8 / 0.2)  # probability 0.8 inside
    result = prompt_inference(logits)
    assert result.masks[0].sum() == 16 and result.masks[1].sum() == 0
    assert result.scores.tolist() == pytest.approx([0.8, 0.0])


def test_ensemble_matches_a_hand_computation():
    query = torch.tensor([[2.0, 0.0, 1.0]])  # C = 2, void last
    clip = torch.tensor([[0.0, 3.0]])
    seen = torch.tensor([True, False])
    out = ensemble_probs(query, clip, seen, alpha=0.4, beta=0.8)
    head = torch.softmax(query, -1)[0]
    p_in = torch.softmax(query[0, :2], -1)
    p_out = torch.softmax(clip[0], -1)
    raw = torch.stack([p_in[0] ** 0.6 * p_out[0] ** 0.4, p_in[1] ** 0.2 * p_out[1] ** 0.8])
    expected = torch.cat([raw / raw.sum() * (1 - head[2]), head[2:]])
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(1))
    alone = ensemble_probs(query, clip, seen, alpha=0.0, beta=0.0)
    assert torch.allclose(alone, head[None], atol=1e-6)


def test_tube_linker_recovers_a_permutation_and_averages_scores():
    torch.manual_seed(0)
    first = torch.randn(5, 16)
    linker = TubeLinker()
    assert linker.link(first).tolist() == [0, 1, 2, 3, 4]
    order = torch.tensor([3, 0, 4, 1, 2])
    second = first[order] + 0.01 * torch.randn(5, 16)
    ids = linker.link(second)
    assert ids.tolist() == order.tolist()
    linker.add_scores(torch.arange(5), torch.full((5, 3), 1 / 3))
    linker.add_scores(ids, torch.tensor([[1.0, 0.0, 0.0]] * 5))
    tracks, scores = linker.video_scores()
    assert tracks.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(scores[0], torch.tensor([2 / 3, 1 / 6, 1 / 6]))
    more = linker.link(torch.randn(7, 16))  # more queries than tracks: two new tracks
    assert sorted(more.tolist()) == list(range(7))


def test_bad_inputs_name_the_argument():
    probs = _probs([[0.9, 0.0, 0.0]])
    masks = _box_masks([(0, 4, 0, 4)])
    with pytest.raises(ValueError, match=r"class_probs has 1 queries, mask_logits 2"):
        panoptic_inference(probs, torch.cat([masks, masks]), IS_THING)
    with pytest.raises(ValueError, match=r"is_thing must be \(3,\) for 3 classes, got \(2,\)"):
        panoptic_inference(probs, masks, IS_THING[:2])
    with pytest.raises(ValueError, match=r"mask_logits must be \(Q, T, H, W\), got \(1, 8, 8\)"):
        semantic_inference(probs, masks[:, 0])
    with pytest.raises(ValueError, match="overlap_threshold must be in"):
        panoptic_inference(probs, masks, IS_THING, overlap_threshold=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        instance_inference(probs, masks, IS_THING, top_k=0)
    with pytest.raises(ValueError, match=r"seen must be \(2,\)"):
        ensemble_probs(torch.zeros(1, 3), torch.zeros(1, 2), torch.tensor([True]))
    with pytest.raises(ValueError, match="no scores recorded"):
        TubeLinker().video_scores()


def test_low_resolution_tubes_with_a_size_give_the_full_size_results_upsampling_only_what_is_kept(monkeypatch):
    """Passing the decoder's tubes and `size` equals upsampling every tube first (the slow
    reference), while panoptic upsamples only its confident queries and instance its top k."""
    import omgseg.model.inference as inference

    gen = torch.Generator().manual_seed(0)
    q, t, size = 12, 2, (29, 37)
    logits = 4 * torch.randn(q, t, 8, 10, generator=gen)
    logits[:3] = -BIG  # three confident queries on three parts of the frame
    logits[0, :, :4, :5] = logits[1, :, 4:] = logits[2, :, :4, 5:] = BIG
    probs = torch.softmax(3 * torch.randn(q, 4, generator=gen), dim=1) * 0.8  # the rest below 0.8
    probs[:, 3] = 1 - probs[:, :3].sum(1)
    probs[:3] = torch.tensor([[0.95, 0.02, 0.02, 0.01], [0.02, 0.95, 0.02, 0.01], [0.01, 0.02, 0.95, 0.02]])
    full = inference.upsample_masks(logits, size)
    assert full.shape == (q, t, *size)

    counted = []
    upsample = inference.upsample_masks

    def counting(masks, out_size, padded_size=None):
        if out_size is not None:
            counted.append(masks.shape[0])
        return upsample(masks, out_size, padded_size)

    monkeypatch.setattr(inference, "upsample_masks", counting)
    fast = panoptic_inference(probs, logits, IS_THING, size=size)
    slow = panoptic_inference(probs, full, IS_THING)
    assert torch.equal(fast.id_map, slow.id_map) and fast.segments == slow.segments and len(slow.segments) > 0
    assert counted == [3]
    counted.clear()
    fast = instance_inference(probs, logits, IS_THING, top_k=5, size=size)
    slow = instance_inference(probs, full, IS_THING, top_k=5)
    assert torch.equal(fast.masks, slow.masks) and torch.equal(fast.labels, slow.labels)
    torch.testing.assert_close(fast.scores, slow.scores)
    assert counted == [5]
    sem_fast, sem_slow = semantic_inference(probs, logits, size=size), semantic_inference(probs, full)
    assert torch.equal(sem_fast.labels, sem_slow.labels)
    assert torch.equal(prompt_inference(logits, size=size).masks, prompt_inference(full).masks)


def test_a_padded_clip_is_upsampled_to_the_padded_input_then_cut_to_its_own_size():
    """A clip padded into a larger batch: its tubes cover the padded input; upsampling to that
    and keeping the clip's top-left corner equals doing so at full size, for every task's
    post-processing and for a ClipPrediction cut with `cropped`."""
    from omgseg.model.omgseg import ClipPrediction
    from omgseg.model.vocabulary import Vocabulary

    gen = torch.Generator().manual_seed(2)
    q, t, padded, own = 6, 1, (32, 40), (27, 31)
    logits = 4 * torch.randn(q, t, 8, 10, generator=gen)
    probs = torch.softmax(4 * torch.randn(q, 4, generator=gen), dim=1)
    full = torch.nn.functional.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    want = full[..., :own[0], :own[1]]
    pred = ClipPrediction(probs, logits, torch.zeros(q, 2), logits[:2], Vocabulary.from_names(["a", "b", "c"]), padded)
    cut = pred.cropped(*own).cropped(*own)  # cutting twice keeps the padded input
    assert cut.padded_size == padded and cut.image_size == own
    assert torch.equal(cut.mask_logits, want) and torch.equal(cut.prompt_mask_logits, want[:2])
    fast = panoptic_inference(probs, logits, IS_THING, object_mask_threshold=0.3, size=own, padded_size=padded)
    slow = panoptic_inference(probs, want, IS_THING, object_mask_threshold=0.3)
    assert torch.equal(fast.id_map, slow.id_map) and fast.segments == slow.segments
    fast = instance_inference(probs, logits, IS_THING, top_k=4, size=own, padded_size=padded)
    assert torch.equal(fast.masks, instance_inference(probs, want, IS_THING, top_k=4).masks)
    assert torch.equal(semantic_inference(probs, logits, size=own, padded_size=padded).labels,
                       semantic_inference(probs, want).labels)
    assert torch.equal(prompt_inference(logits, size=own, padded_size=padded).masks, prompt_inference(want).masks)
