"""The assembled tiny OMG-Seg model: every task's outputs, freezing, isolation, checkpoints."""

import json
import subprocess
import sys

import open_clip
import pytest
import torch

from omgseg.core.structures import Category
from omgseg.model.checkpoint import load_checkpoint, save_checkpoint
from omgseg.model.config import ModelConfig, model_config, omgseg_convnext_large, with_overrides
from omgseg.model.decoder import video_position_encoding
from omgseg.model.inference import instance_inference, panoptic_inference, prompt_inference, semantic_inference
from omgseg.model.omgseg import OMGSeg, parameter_counts
from omgseg.model.structures import MatchTargets, PromptBatch
from omgseg.model.vocabulary import Vocabulary

H, W = 64, 96


@pytest.fixture(scope="module")
def model() -> OMGSeg:
    torch.manual_seed(0)
    return OMGSeg(model_config("tiny"))


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.from_categories([
        Category(1, "person", True, ("human",)), Category(2, "car", True), Category(7, "sky", False),
    ])


def _images(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _targets(t: int, prompts: int = 0) -> MatchTargets:
    masks = torch.zeros(2, t, H, W, dtype=torch.bool)
    masks[0, :, 5:30, 10:40] = True
    masks[1, :, 35:60, 50:90] = True
    return MatchTargets(
        labels=torch.tensor([0, 2]), masks=masks, track_ids=torch.tensor([1, 2]),
        prompt_masks=masks[:prompts] if prompts else None,
    )


@pytest.mark.parametrize("t", [1, 3])
def test_forward_loss_and_predict_shapes(model, vocabulary, t):
    prompts = [PromptBatch.from_points(torch.tensor([[20.0, 15.0], [70.0, 50.0]]), (H, W))]
    outputs = model(_images(1, t), vocabulary, prompts)
    q = outputs.queries
    queries = model.config.decoder.num_object_queries
    assert q.mask_logits.shape == (1, queries + 2, t, H // 4, W // 4)
    assert q.class_logits.shape == (1, queries + 2, len(vocabulary) + 1)
    assert len(q.aux) == model.config.decoder.num_layers
    losses = model.loss(outputs, [_targets(t, prompts=2)])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_prompt_mask", "loss_prompt_dice"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())

    (pred,) = model.predict(_images(1, t), vocabulary, prompts)
    assert pred.class_probs.shape == (queries, len(vocabulary) + 1)
    assert torch.allclose(pred.class_probs.sum(-1), torch.ones(queries), atol=1e-5)
    assert pred.mask_logits.shape == (queries, t, H, W)
    assert pred.prompt_mask_logits.shape == (2, t, H, W)
    assert pred.embeddings.shape == (queries, model.config.decoder.d_model)
    is_thing = torch.tensor(vocabulary.is_thing)
    panoptic = panoptic_inference(pred.class_probs, pred.mask_logits, is_thing, object_mask_threshold=0.0)
    assert panoptic.id_map.shape == (t, H, W) and panoptic.id_map.dtype == torch.int64
    instance = instance_inference(pred.class_probs, pred.mask_logits, is_thing, top_k=5)
    assert instance.masks.shape == (5, t, H, W)
    assert set(instance.labels.tolist()) <= {0, 1}  # things only
    semantic = semantic_inference(pred.class_probs, pred.mask_logits)
    assert semantic.labels.shape == (t, H, W)
    assert prompt_inference(pred.prompt_mask_logits).masks.shape == (2, t, H, W)


def test_a_new_vocabulary_at_inference_needs_no_retraining(model):
    vocab = Vocabulary.from_names(["zebra", "giraffe, camelopard", "tree", "road", "balloon"], [1, 1, 0, 0, 1])
    (pred,) = model.predict(_images(1, 1), vocab)
    assert pred.class_probs.shape == (model.config.decoder.num_object_queries, 6)


def test_synonyms_score_as_their_best_member(model, vocabulary):
    table = model.text_embeddings(vocabulary)  # (C, S, D)
    assert table.shape[:2] == (3, 2)
    assert torch.equal(table[1, 0], table[1, 1])  # 'car' has one synonym: padded by repeating it
    person_only = Vocabulary.from_names(["person"])
    human_only = Vocabulary.from_names(["human"])
    outputs = model(_images(1, 1), vocabulary)
    best = torch.maximum(
        model(_images(1, 1), person_only).queries.class_logits[..., 0],
        model(_images(1, 1), human_only).queries.class_logits[..., 0],
    )
    assert torch.allclose(outputs.queries.class_logits[..., 0], best, atol=1e-4)


def test_prompt_queries_leave_object_queries_unchanged(model, vocabulary):
    images = _images(1, 2)
    plain = model(images, vocabulary).queries
    prompts = [PromptBatch.from_points(torch.tensor([[20.0, 15.0]]), (H, W))]
    prompted = model(images, vocabulary, prompts).queries
    n = plain.num_object_queries
    assert torch.allclose(plain.mask_logits, prompted.mask_logits[:, :n], atol=1e-5)
    assert torch.allclose(plain.class_logits, prompted.class_logits[:, :n], atol=1e-5)


def test_encoded_features_are_reused_exactly(model, vocabulary):
    """Interactive rounds encode an image once and decode new clicks: same as a full pass."""
    images = _images(1, 2, seed=3)
    with torch.no_grad():  # as predict and the interactive tasks encode: the inference sampling path
        encoded = model.encode(images)
    for clicks in ([[20.0, 15.0]], [[70.0, 50.0], [10.0, 10.0]]):
        prompts = [PromptBatch.from_points(torch.tensor(clicks), (H, W))]
        (full,) = model.predict(images, vocabulary, prompts)
        (reused,) = model.predict(None, vocabulary, prompts, encoded=encoded)
        assert torch.equal(full.prompt_mask_logits, reused.prompt_mask_logits)
        assert torch.equal(full.class_probs, reused.class_probs)
    with pytest.raises(ValueError, match="needs images or encoded features"):
        model(None, vocabulary)


def test_training_step_leaves_the_frozen_backbone_unchanged(vocabulary):
    torch.manual_seed(1)
    model = OMGSeg(model_config("tiny")).train()
    assert not model.backbone.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = model.loss(model(_images(1, 1), vocabulary), [_targets(1)])
    sum(losses.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_a_training_step_after_predict_reuses_its_caches():
    # predict runs in inference mode; the text embeddings and sized constants it builds first
    # are cached, and a training step on the same vocabulary and size must be able to use them.
    # A size and vocabulary no other test uses, so that predict is what builds them.
    torch.manual_seed(2)
    model = OMGSeg(model_config("tiny"))
    vocab = Vocabulary.from_names(["cat", "dog", "grass"], [1, 1, 0])
    h, w = 160, 224
    images = torch.randint(0, 256, (1, 1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    (pred,) = model.eval().predict(images, vocab)
    assert pred.class_probs.is_inference()
    # What predict cached is an ordinary tensor: training may save it for backward.
    assert not model.text.embeddings(vocab).is_inference()
    d = model.config.decoder.d_model
    assert not video_position_encoding(1, h // 32, w // 32, d, torch.device("cpu"), torch.float32).is_inference()
    masks = torch.zeros(1, 1, h, w, dtype=torch.bool)
    masks[0, :, 20:90, 30:120] = True
    model.train()
    losses = model.loss(model(images, vocab), [MatchTargets(labels=torch.tensor([1]), masks=masks, track_ids=torch.tensor([1]))])
    sum(losses.values()).backward()
    assert model.decoder.class_embed.weight.grad is not None


def test_checkpoint_round_trip_with_a_local_clip_checkpoint(tmp_path, vocabulary):
    # A CLIP checkpoint written here, as a user's downloaded weights would be.
    torch.manual_seed(3)
    clip = open_clip.create_model("tiny_clip", pretrained=None)
    clip_path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), clip_path)
    model = OMGSeg(model_config("tiny", clip_checkpoint=str(clip_path)))
    assert torch.equal(model.backbone.clip.logit_scale, clip.logit_scale)
    model.seen_names = {"person", "car"}
    path = save_checkpoint(model, tmp_path / "run" / "model.pt", extra={"step": 7})
    assert not (tmp_path / "run" / "model.pt.partial").exists()

    loaded, extra = load_checkpoint(path)
    assert extra == {"step": 7}
    assert loaded.seen_names == {"person", "car"}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, loaded.state_dict()[key]), key
    images = _images(1, 1)
    assert torch.allclose(model.predict(images, vocabulary)[0].class_probs,
                          loaded.predict(images, vocabulary)[0].class_probs)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ValueError, match="bad.pt: not an omgseg checkpoint"):
        load_checkpoint(bad)
    code = tmp_path / "code.pt"
    torch.save({"format": 1, "hook": subprocess.Popen}, code)  # a pickle that would name a callable
    with pytest.raises(ValueError, match="code.pt: not an omgseg checkpoint .*objects other than weights"):
        load_checkpoint(code)
    with pytest.raises(FileNotFoundError, match="missing_clip.pt"):
        OMGSeg(model_config("tiny", clip_checkpoint=str(tmp_path / "missing_clip.pt")))


def test_config_round_trip_and_errors():
    config = model_config("tiny")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        model_config("huge")
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\] in model config 'decoder'"):
        ModelConfig.from_dict({**config.to_dict(), "decoder": {"depth": 3}})
    with pytest.raises(ValueError, match="must equal decoder.d_model"):
        config.replace(decoder=omgseg_convnext_large().decoder)


def test_tiny_parameter_counts(model):
    counts = parameter_counts(model)
    assert counts["trainable"] == counts["pixel_decoder"] + counts["decoder_layers"] + counts[
        "queries_and_heads"] + counts["prompt_encoder"]
    assert counts["total"] == counts["trainable"] + counts["backbone_visual"] + counts["backbone_text"]
    assert 0.3e6 < counts["trainable"] < 3e6


def test_model_info_cli():
    done = subprocess.run(
        [sys.executable, "-m", "omgseg.platform.cli", "model-info", "tiny"], capture_output=True, text=True, check=True
    )
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["config"] == "tiny" and info["input_size"] == [96, 128]
    assert info["parameters"]["trainable"] < info["parameters"]["total"]
    bad = subprocess.run([sys.executable, "-m", "omgseg.platform.cli", "model-info", "huge"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown model config 'huge'" in bad.stderr


def test_checkpoint_of_a_random_weight_clip_keeps_the_backbone(tmp_path, vocabulary):
    torch.manual_seed(4)
    model = OMGSeg(model_config("tiny"))
    path = save_checkpoint(model, tmp_path / "model.pt")
    torch.manual_seed(5)  # a different random CLIP would be built without the saved weights
    loaded, _ = load_checkpoint(path)
    images = _images(1, 1)
    assert torch.allclose(model.predict(images, vocabulary)[0].mask_logits,
                          loaded.predict(images, vocabulary)[0].mask_logits, atol=1e-5)


def test_a_warm_start_loads_the_weights_and_refuses_another_model(tmp_path):
    import dataclasses

    from omgseg.model.checkpoint import load_weights, save_checkpoint

    torch.manual_seed(0)
    trained = OMGSeg(model_config("tiny"))
    path = save_checkpoint(trained, tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = OMGSeg(model_config("tiny"))
    load_weights(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), fresh.parameters()))
    other = model_config("tiny")
    other = dataclasses.replace(other, decoder=dataclasses.replace(other.decoder, num_object_queries=7))
    with pytest.raises(ValueError, match=r"model.pt: weights do not fit model 'tiny': shapes differ for \['decoder.query"):
        load_weights(OMGSeg(other), path)
    with pytest.raises(FileNotFoundError, match="nowhere.pt does not exist"):
        load_weights(fresh, tmp_path / "nowhere.pt")


def test_a_checkpoint_of_another_model_config_is_one_line_naming_keys(tmp_path):
    """A model.pt whose config was edited (another decoder width) or that is warm-started into
    another config: one line naming the tensors that do not fit, not torch's size-mismatch list;
    a truncated file is one line too."""
    from omgseg.model.checkpoint import load_weights

    torch.manual_seed(0)
    model = OMGSeg(model_config("tiny"))
    path = save_checkpoint(model, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["decoder"]["num_layers"] = payload["config"]["decoder"]["num_layers"] - 1
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=r"edited.pt: weights do not fit model 'tiny': .*unexpected \['decoder\.") as err:
        load_checkpoint(tmp_path / "edited.pt")
    assert "\n" not in str(err.value)
    other = OMGSeg(with_overrides(model_config("tiny"), {"decoder.num_object_queries": 25}))
    with pytest.raises(ValueError, match=r"model.pt: weights do not fit model 'tiny': shapes differ for \['") as err:
        load_weights(other, path)
    assert "\n" not in str(err.value)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_a_warm_started_checkpoint_refers_to_its_start_for_the_random_clip(tmp_path, vocabulary):
    """Trials warm-started from one pretrained model share its random-weight CLIP: their files
    refer to the start's file instead of copying it, load to the same predictions (through a
    chain of warm starts, and after the folder is moved), and a missing start is one line."""
    import shutil

    from omgseg.model.checkpoint import load_weights

    torch.manual_seed(0)
    start = save_checkpoint(OMGSeg(model_config("tiny")), tmp_path / "study" / "pretrain" / "model.pt")
    torch.manual_seed(1)
    trial = OMGSeg(model_config("tiny"))
    load_weights(trial, start)
    with torch.no_grad():
        trial.decoder.class_embed.weight.add_(0.5)  # a trained head, the CLIP untouched
    path = save_checkpoint(trial, tmp_path / "study" / "trials" / "a" / "model.pt", frozen_clip_from=start)
    assert path.stat().st_size < start.stat().st_size / 10
    assert not any(k.startswith("backbone.clip.") for k in torch.load(path, weights_only=True)["model"])

    images = torch.randint(0, 256, (1, 1, 3, 96, 128), dtype=torch.uint8)
    expected = trial.predict(images, vocabulary)[0].mask_logits
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.predict(images, vocabulary)[0].mask_logits, expected)
    torch.manual_seed(2)
    again = OMGSeg(model_config("tiny"))
    load_weights(again, path)  # a warm start from the trial reads the CLIP from the start
    assert all(torch.equal(a, b) for a, b in zip(trial.parameters(), again.parameters()))
    second = save_checkpoint(again, tmp_path / "study" / "trials" / "b" / "model.pt", frozen_clip_from=path)
    assert torch.equal(load_checkpoint(second)[0].predict(images, vocabulary)[0].mask_logits, expected)

    moved = tmp_path / "moved"
    shutil.move(tmp_path / "study", moved)  # the relative reference still finds the start
    assert torch.equal(load_checkpoint(moved / "trials" / "b" / "model.pt")[0].predict(images, vocabulary)[0].mask_logits,
                       expected)
    (moved / "pretrain" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"trials/a/model.pt: its frozen CLIP weights are in .*pretrain/model.pt"):
        load_checkpoint(moved / "trials" / "a" / "model.pt")
    with pytest.raises(FileNotFoundError, match="frozen CLIP weights are in"):
        load_weights(OMGSeg(model_config("tiny")), moved / "trials" / "a" / "model.pt")
