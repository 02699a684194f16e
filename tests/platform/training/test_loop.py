"""The training loop's promises, on the synthetic shards: common random numbers (a data set's
samples are treated identically in every mix), exact exposure, an exact resume, and TAG
probes that leave the training trajectory bit-identical."""

from pathlib import Path

import pytest
import torch

from omgseg.model.checkpoint import save_checkpoint
from omgseg.model.config import model_config
from omgseg.model.omgseg import OMGSeg
from omgseg.platform.config import TrainConfig, load_config
from omgseg.platform.data import prepare_data
from omgseg.platform.training.loop import build_parts, train_loop
from omgseg.platform.training.train import _payload

CONFIG = Path(__file__).resolve().parents[3] / "studies" / "configs" / "train_tiny.yaml"


def _config(root: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [
        f"data.root={root}", "mix={coco: 1}", "resources.workers=1", "steps=6", "log_every=3", "evaluation={}",
        "optimizer.warmup_steps=2", *overrides])


@pytest.fixture(scope="module")
def root(study_data_root):
    prepare_data(_config(study_data_root).data)
    return study_data_root


def _coco_examples(config: TrainConfig, batches: int) -> list[tuple]:
    parts, _ = build_parts(config, 0, 1, torch.device("cpu"))
    out = []
    for _ in range(batches):
        batch = next(parts.batches)
        for k, name in enumerate(batch.datasets):
            if name == "coco":
                t, p = batch.targets[k], batch.prompts[k]
                out.append((batch.images[k], t.masks, t.labels, t.track_ids, t.prompt_masks, t.seed, p.boxes, p.clicks))
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_coco_batches_are_bit_identical_with_and_without_davis(root):
    alone = _coco_examples(_config(root, "mix={coco: 1}"), batches=5)  # 10 COCO samples
    mixed = _coco_examples(_config(root, "mix={coco: 1, davis: 1}"), batches=10)  # 10 COCO + 10 DAVIS
    assert len(alone) == len(mixed) == 10
    for k, (a, b) in enumerate(zip(alone, mixed)):
        assert all(_same(x, y) for x, y in zip(a, b)), f"COCO sample {k} differs between the two mixes"
    other_seed = _coco_examples(_config(root, "mix={coco: 1}", "seed=1"), batches=5)
    assert not all(_same(x, y) for x, y in zip(alone[0], other_seed[0]))


def _batch_fields(batch) -> list:
    """Every tensor and value of a batch, in a fixed order."""
    out = [batch.images, batch.datasets]
    for t, p in zip(batch.targets, batch.prompts):
        out += [t.labels, t.masks, t.track_ids, t.prompt_masks, t.supervise_objects, t.seed,
                p.boxes, p.kinds, p.clicks, p.click_labels]
    return out


def _draw(parts, n: int) -> list[list]:
    return [_batch_fields(next(parts.batches)) for _ in range(n)]


def test_batches_are_the_same_for_any_number_of_loader_workers_and_after_a_resume(root):
    """Clips made in 0, 1 or 2 loader processes, from the start or resumed from a checkpoint's
    counts and stream positions (shuffle buffers mid-shard): bit-identical batches."""
    config = _config(root, "mix={coco: 1, vipseg: 1, davis: 1}", "batch.shuffle_buffer=4")
    reference, _ = build_parts(config.model_copy(update={"batch": config.batch.model_copy(update={"loader_workers": 0})}),
                               0, 1, torch.device("cpu"))
    whole = _draw(reference, 8)
    for workers in (1, 2):
        loaded = config.model_copy(update={"batch": config.batch.model_copy(update={"loader_workers": workers})})
        parts, state = build_parts(loaded, 0, 1, torch.device("cpu"))
        first = _draw(parts, 3)
        saved = _payload(parts, [state])
        parts.batches.close()
        resumed, _ = build_parts(loaded, 0, 1, torch.device("cpu"), saved=saved)
        got = first + _draw(resumed, 5)
        resumed.batches.close()
        for k, (a, b) in enumerate(zip(whole, got)):
            assert all(_same(x, y) for x, y in zip(a, b)), f"batch {k} differs with {workers} loader workers"


def test_a_loader_error_is_raised_in_the_training_process_with_its_own_message(root):
    config = _config(root, "batch.loader_workers=1")
    parts, _ = build_parts(config, 0, 1, torch.device("cpu"))
    parts.batches.maker.label_maps["coco"] = {}  # the worker's copy is made when the loader starts
    with pytest.raises(KeyError, match=r"category ids \[.*\] are not in the vocabulary \(known: \[\]\)"):
        next(parts.batches)
    parts.batches.close()


def test_exposure_is_exact(root):
    parts, state = build_parts(_config(root, "mix={coco: 1, vipseg: 1, davis: 1}", "steps=9"), 0, 1, torch.device("cpu"))
    train_loop(parts, state)
    assert state.counts == {"coco": 6, "vipseg": 6, "davis": 6}  # 9 steps x 2 clips, in thirds


def _weights(parts) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in parts.model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("warm_start", [False, True])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(root, tmp_path, warm_start):
    """Also from a warm start, whose resumable checkpoint leaves the frozen random CLIP to the
    start's file instead of copying it, and with the clips made by a loader process."""
    overrides = ["batch.loader_workers=1"] if warm_start else []
    if warm_start:
        torch.manual_seed(7)
        start = save_checkpoint(OMGSeg(model_config("tiny")), tmp_path / "start.pt")
        overrides = [f"model.init_checkpoint={start}"]
    config = _config(root, "mix={coco: 1, davis: 1}", *overrides)
    whole, state = build_parts(config, 0, 1, torch.device("cpu"))
    train_loop(whole, state)

    class Crash(Exception):
        pass

    def crash_after_a_checkpoint(parts, state, batch, losses):
        if state.step == 3:
            saved.update(_payload(parts, [state]))
            raise Crash

    saved = {}
    first, state = build_parts(config, 0, 1, torch.device("cpu"))
    with pytest.raises(Crash):
        train_loop(first, state, [crash_after_a_checkpoint])
    assert any(k.startswith("backbone.clip.") for k in saved["model"]) is not warm_start
    resumed, state = build_parts(config, 0, 1, torch.device("cpu"), saved=saved)
    assert state.step == 3 and state.counts == {"coco": 3, "davis": 3}
    train_loop(resumed, state)
    ends = _weights(whole), _weights(resumed)
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_probing_leaves_the_training_trajectory_bit_identical(root):
    from omgseg.platform.training.affinity import AffinityProbe

    config = _config(root, "mix={coco: 1, davis: 1}",
                     "affinity={enabled: true, every: 2, batch_size: 2, heldout_samples: 3, forward_batch_size: 2}")
    plain, state = build_parts(config, 0, 1, torch.device("cpu"))
    train_loop(plain, state)
    probed, state = build_parts(config, 0, 1, torch.device("cpu"))
    probe = AffinityProbe(probed, state)
    held = probe.heldout["coco"]
    assert [len(b.targets) for b in held.batches] == [2, 1] and len(held.towers) == 2  # frozen maps computed once
    train_loop(probed, state, [probe])
    assert len(state.affinity["history"]) == 3  # steps 2, 4, 6
    ends = _weights(plain), _weights(probed)
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_a_warm_started_run_refers_to_its_start_for_the_frozen_clip(root, tmp_path, monkeypatch):
    """A warm-started run's model.pt, and its MLflow copy, carry the trained weights and a
    reference to the start's random CLIP (not a copy of it), and load to the run's model; the
    run's resume checkpoint is removed once it has finished."""
    import mlflow

    from omgseg.model.checkpoint import load_checkpoint
    from omgseg.model.vocabulary import Vocabulary
    from omgseg.platform.training import train
    from omgseg.platform.training.train import RESUME_DIR, run_training

    torch.manual_seed(7)
    start = save_checkpoint(OMGSeg(model_config("tiny")), tmp_path / "start.pt")
    config = _config(root, "steps=2", "checkpoint_every=1", f"model.init_checkpoint={start}", f"output_dir={tmp_path / 'runs'}")
    written = []
    monkeypatch.setattr(train, "_payload", lambda parts, states: written.append(states[0].step) or _payload(parts, states))
    result = run_training(config, prepare=False, in_process=True, quiet=True)
    assert written == [1] and not (result.run_dir / RESUME_DIR).exists()  # removed once the run finished
    assert result.checkpoint.stat().st_size < start.stat().st_size / 10
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    copy = Path(client.download_artifacts(result.run_id, "model.pt", str(tmp_path / "downloaded")))
    images = torch.randint(0, 256, (1, 1, 3, 96, 128), dtype=torch.uint8)
    vocabulary = Vocabulary.from_names(["triangle", "sky"], [True, False])
    run_model, _ = load_checkpoint(result.checkpoint)
    copy_model, _ = load_checkpoint(copy)
    start_model, _ = load_checkpoint(start)
    assert all(torch.equal(a, b) for a, b in zip(run_model.backbone.clip.parameters(), start_model.backbone.clip.parameters()))
    assert torch.equal(run_model.predict(images, vocabulary)[0].mask_logits, copy_model.predict(images, vocabulary)[0].mask_logits)
