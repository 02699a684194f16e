"""Benchmark of the input pipeline; prints one JSON line. Sections (--sections, default all):

readers: the shard reader against reading COCO panoptic files directly. Both paths decode the
    same images and id maps into `ClipSample`s and apply the same `ClipTransform`; they differ
    only in where the bytes come from: sequential reads of a few tar shards, or one JPEG, one
    PNG and a parsed JSON record per image (as detectron2-style loaders do). Each path runs a
    full pass with 0 and with 2 DataLoader workers, interleaved, best of `--repeats`, once with
    the files in the page cache ("warm") and once after dropping them from it with
    posix_fadvise ("cold", i.e. read from the disk). A read-only pass (bytes, no decoding) of
    both layouts, cold, shows the I/O difference on its own.
convert: `omgseg convert` with 2 worker processes against 1 on the readers' source
    (`convert_speedup`), and whether the two wrote the same bytes (`convert_identical`).
clips: ms to make one training clip at the paper's resolution (the `batch:` block of
    studies/configs/omgseg_paper.yaml: 736x1280 crops of 2 frames, scale jitter 0.8-2, 20
    prompts) from synthetic COCO and VIPSeg data of that size, for COCO (panoptic, instance,
    semantic), COCO-SAM (the same images, click prompts only) and VIPSeg (video panoptic):
    `ClipMaker` against the previous whole-frame implementation (tests/clip_reference.py),
    interleaved, best of --repeats, one thread. `clip_identical`: labels, masks and prompts
    equal, image pixels within one grey level.
resume: seconds to resume the training batches of a tiny run (train_tiny.yaml's data sets,
    each stream with its shuffle buffer) at step 4K against step K (`resume_ratio`): the
    streams built from the checkpoint's positions and the first batch made. `reread_s`: what
    the previous resume did instead, reading every sample before the position again.
wait: the share of a tiny-model training run's wall time spent waiting for the next batch
    (`data_wait_share`), with 0 and with 1 loader process (train_tiny.yaml, one rank, one
    training thread).

    python tests/benchmarks/bench_data.py --sections clips resume wait
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from omgseg.core.seeds import derive_seed
from omgseg.core.structures import Task
from omgseg.datasets.clip import Segment, decode_id_map_rgb
from omgseg.datasets.convert import convert
from omgseg.datasets.manifest import read_manifest
from omgseg.datasets.shard_reader import read_shard_samples
from omgseg.datasets.stream import ClipSample, ShardStream
from omgseg.datasets.synth import SynthSizes, write_synthetic
from omgseg.datasets.transforms import ClipTransform
from omgseg.model.vocabulary import merge_vocabularies
from omgseg.platform.config import BatchConfig, TrainConfig, load_config
from omgseg.platform.data import prepare_data
from omgseg.platform.training.batches import ClipMaker
from omgseg.platform.training.loop import (
    WorkerState,
    build_batches,
    build_parts,
    dataset_vocabularies,
    mixed_datasets,
    train_loop,
    train_stream,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the previous clip path, kept as the tests' reference

TASKS = (Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC, Task.INTERACTIVE)


class DirectCocoPanoptic(torch.utils.data.Dataset):
    """COCO panoptic read straight from its files: the JSON parsed once, then per item the
    JPEG and the RGB-encoded PNG opened, decoded and turned into a ClipSample."""

    def __init__(self, root: Path, split: str, transform: ClipTransform, seed: int) -> None:
        self.root = root
        self.split = split
        data = json.loads((root / "annotations" / f"panoptic_{split}2017.json").read_text())
        images = {image["id"]: image for image in data["images"]}
        self.items = [(images[ann["image_id"]], ann) for ann in data["annotations"]]
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ClipSample:
        image, ann = self.items[index]
        with Image.open(self.root / f"{self.split}2017" / image["file_name"]) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        with Image.open(self.root / "annotations" / f"panoptic_{self.split}2017" / ann["file_name"]) as im:
            ids = decode_id_map_rgb(np.asarray(im.convert("RGB"), dtype=np.uint8))
        segments = tuple(
            Segment(id=s["id"], category_id=s["category_id"], iscrowd=bool(s["iscrowd"]), track_id=s["id"], area=(s["area"],))
            for s in ann["segments_info"]
        )
        sample = ClipSample(
            dataset="coco_panoptic",
            source_id=str(image["id"]),
            frame_names=(image["file_name"],),
            tasks=TASKS,
            images=torch.from_numpy(rgb).permute(2, 0, 1)[None],
            id_maps=torch.from_numpy(ids.astype(np.int64))[None],
            segments=segments,
            key=str(image["id"]),
            shard=ann["file_name"],
        )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "bench", index))
        return self.transform(sample, generator)


class TransformedStream(torch.utils.data.IterableDataset):
    """A ShardStream with the training transform applied in the worker."""

    def __init__(self, stream: ShardStream, transform: ClipTransform, seed: int) -> None:
        super().__init__()
        self.stream = stream
        self.transform = transform
        self.seed = seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "bench-worker", worker))
        for sample in self.stream:
            yield self.transform(sample, generator)


def timed_pass(dataset: torch.utils.data.Dataset, workers: int, shuffle: bool) -> tuple[float, int, int]:
    """Seconds for one full pass, samples seen and pixels of id maps checked (so the
    work cannot be skipped)."""
    kwargs = {"shuffle": shuffle} if shuffle else {}
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, persistent_workers=False, **kwargs
    )
    start = time.perf_counter()
    count = 0
    labelled = 0
    for sample in loader:
        count += 1
        labelled += int((sample.id_maps > 0).sum())
    return time.perf_counter() - start, count, labelled


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files from the page cache (no root needed), so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (freshly written files) are not dropped otherwise
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_only_pass(shard_files: list[Path], direct_files: list[Path]) -> dict[str, float]:
    """Seconds to read every byte of each layout from a cold cache, without decoding:
    shards in sequence, the direct files in a shuffled order as a shuffling loader reads them."""
    drop_page_cache(shard_files)
    start = time.perf_counter()
    for path in shard_files:
        for _ in read_shard_samples(path):
            pass
    shards_s = time.perf_counter() - start
    order = list(direct_files)
    random.Random(0).shuffle(order)
    drop_page_cache(order)
    start = time.perf_counter()
    for path in order:
        path.read_bytes()
    return {"shards": shards_s, "direct": time.perf_counter() - start}


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def coco_source(args: argparse.Namespace, tmp: Path) -> tuple[Path, float]:
    """The synthetic COCO panoptic source of the `readers` and `convert` sections, and the
    seconds it took to write."""
    sizes = SynthSizes(height=args.height, width=args.width, coco_train=args.images, coco_val=1,
                       ade_train=1, ade_val=1, video_train=1, video_val=1)
    t0 = time.perf_counter()
    src = write_synthetic(tmp / "synth", formats=["coco-panoptic"], seed=0, sizes=sizes, progress=False)["coco-panoptic"]
    return src, time.perf_counter() - t0


def measure_readers(args: argparse.Namespace, src: Path, synth_s: float, tmp: Path) -> dict[str, object]:
    """The `readers` section: shard reading against direct files, warm and cold."""
    t0 = time.perf_counter()
    convert("coco-panoptic", src, tmp / "shards", split="train",
            samples_per_shard=args.samples_per_shard, progress=False)
    convert_s = time.perf_counter() - t0

    transform = ClipTransform(crop_size=(args.crop, args.crop))
    shard_files = sorted((tmp / "shards").glob("*.tar"))
    direct_files = [src / "annotations" / "panoptic_train2017.json"]
    direct_files += sorted((src / "train2017").iterdir()) + sorted((src / "annotations" / "panoptic_train2017").iterdir())
    shard_mb = folder_bytes(shard_files) / 1e6
    direct_mb = folder_bytes(direct_files) / 1e6

    results: dict[str, object] = {
        "images": args.images,
        "image_size": [args.height, args.width],
        "crop": args.crop,
        "shards": len(shard_files),
        "shard_mb": round(shard_mb, 2),
        "direct_mb": round(direct_mb, 2),
        "direct_files": len(direct_files),
        "synth_s": round(synth_s, 2),
        "convert_s": round(convert_s, 2),
    }
    io = read_only_pass(shard_files, direct_files)
    results["io_cold_shards_mb_per_s"] = round(shard_mb / io["shards"], 1)
    results["io_cold_direct_mb_per_s"] = round(direct_mb / io["direct"], 1)
    results["io_cold_speedup"] = round(io["direct"] / io["shards"], 2)
    for cache in ("warm", "cold"):
        for workers in args.workers:
            best = {"shards": float("inf"), "direct": float("inf")}
            for _ in range(args.repeats):
                shards = TransformedStream(ShardStream(tmp / "shards", shuffle_buffer=64, seed=0), transform, seed=0)
                direct = DirectCocoPanoptic(src, "train", transform, seed=0)
                for name, dataset, shuffle, files in (
                    ("shards", shards, False, shard_files), ("direct", direct, True, direct_files)
                ):
                    if cache == "cold":
                        drop_page_cache(files)
                    seconds, count, labelled = timed_pass(dataset, workers, shuffle)
                    if count != args.images or labelled == 0:
                        raise RuntimeError(f"{name} pass saw {count} samples ({labelled} labelled pixels), expected {args.images}")
                    best[name] = min(best[name], seconds)
                    print(f"{cache} workers={workers} {name}: {count / seconds:.1f} samples/s", file=sys.stderr)
            key = f"{cache}_w{workers}"
            results[f"{key}_shards_samples_per_s"] = round(args.images / best["shards"], 1)
            results[f"{key}_direct_samples_per_s"] = round(args.images / best["direct"], 1)
            results[f"{key}_shards_mb_per_s"] = round(shard_mb / best["shards"], 1)
            results[f"{key}_direct_mb_per_s"] = round(direct_mb / best["direct"], 1)
            results[f"{key}_speedup"] = round(best["direct"] / best["shards"], 2)
    return results


def convert_speed(src: Path, out: Path, samples_per_shard: int = 8, repeats: int = 2) -> dict[str, object]:
    """`omgseg convert --workers 2` against `--workers 1` on the same COCO panoptic source, best
    of `repeats` each, interleaved, and whether the two wrote the same bytes. Small shards, so
    that two workers share the work as evenly as on a real split of thousands of shards."""
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(repeats):
        for workers in best:
            folder = out / f"w{workers}"
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            convert("coco-panoptic", src, folder, split="train", samples_per_shard=samples_per_shard, workers=workers)
            best[workers] = min(best[workers], time.perf_counter() - start)
            print(f"convert --workers {workers}: {time.perf_counter() - start:.2f} s", file=sys.stderr)

    def written(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}

    manifests = [dataclasses.replace(read_manifest(out / f"w{w}"), created="") for w in best]
    return {
        "convert_samples_per_shard": samples_per_shard,
        "convert_w1_s": round(best[1], 2),
        "convert_w2_s": round(best[2], 2),
        "convert_speedup": round(best[1] / best[2], 2),
        "convert_identical": written(out / "w1") == written(out / "w2") and manifests[0] == manifests[1],
    }


PAPER = ROOT / "studies" / "configs" / "omgseg_paper.yaml"
CLIP_KINDS = {  # benchmark name: (shard folder, tasks it supervises)
    "coco": ("coco", {Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC}),
    "coco_sam": ("coco", {Task.INTERACTIVE}),
    "vipseg": ("vipseg", {Task.VIDEO_PANOPTIC, Task.VIDEO_INSTANCE}),
}


def _same_example(new, old) -> bool:
    """Labels, masks, seeds and prompts equal; image pixels within one grey level."""
    if new.images.shape != old.images.shape or int((new.images.int() - old.images.int()).abs().max()) > 1:
        return False
    pairs = [(getattr(new.targets, f.name), getattr(old.targets, f.name)) for f in dataclasses.fields(new.targets)]
    pairs += [(getattr(new.prompts, f.name), getattr(old.prompts, f.name)) for f in dataclasses.fields(new.prompts)]
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in pairs)


def measure_clips(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """The `clips` section: ClipMaker against the previous whole-frame path, at the paper's size."""
    from clip_reference import make_example

    paper = yaml.safe_load(PAPER.read_text())
    batch = BatchConfig(**paper["train"]["batch"])
    sizes = SynthSizes(height=args.clip_height, width=args.clip_width, coco_train=args.clips, coco_val=1, ade_train=1,
                       ade_val=1, video_train=args.clips, video_val=1, min_frames=5, max_frames=6)
    src = write_synthetic(tmp / "synth", formats=["coco-panoptic", "vipseg"], seed=0, sizes=sizes, progress=False)
    convert("coco-panoptic", src["coco-panoptic"], tmp / "coco", split="train", progress=False)
    convert("vipseg", src["vipseg"], tmp / "vipseg", split="train", clip_length=batch.frames, progress=False)
    samples = {folder: list(itertools.islice(ShardStream(tmp / folder), args.clips)) for folder in ("coco", "vipseg")}
    identity = {c: c for c in range(1 << 16)}  # every category id to itself: vocabularies do not matter here
    supervised = {name: tasks for name, (_, tasks) in CLIP_KINDS.items()}
    maker = ClipMaker(batch, dict.fromkeys(CLIP_KINDS, identity), supervised)
    best = {name: {"new": float("inf"), "previous": float("inf")} for name in CLIP_KINDS}
    identical = True
    for _ in range(args.repeats):
        for name, (folder, _) in CLIP_KINDS.items():
            for which in ("new", "previous"):
                started = time.perf_counter()
                examples = [maker(name, sample, key) if which == "new" else
                            make_example(batch, maker.label_maps, supervised, name, sample, key)
                            for key, sample in enumerate(samples[folder])]
                best[name][which] = min(best[name][which], (time.perf_counter() - started) / len(examples))
                if which == "new":
                    made = examples
            identical &= all(_same_example(a, b) for a, b in zip(made, examples))
            print(f"clips {name}: new {1000 * best[name]['new']:.1f} ms, previous {1000 * best[name]['previous']:.1f} ms",
                  file=sys.stderr)
    segments = {folder: statistics.mean(len(s.segments) for s in samples[folder]) for folder in samples}
    return {
        "clip_size": [args.clip_height, args.clip_width],
        "clip_crop": list(batch.crop),
        "clips_per_kind": args.clips,
        "clip_segments_mean": {k: round(v, 1) for k, v in segments.items()},
        "clip_ms": {name: {k: round(1000 * v, 1) for k, v in times.items()} for name, times in best.items()},
        "clip_speedup": {name: round(times["previous"] / times["new"], 1) for name, times in best.items()},
        "clip_identical": identical,
    }


TINY = ROOT / "studies" / "configs" / "train_tiny.yaml"


def _tiny_config(data_root: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, [f"data.root={data_root}", "resources.workers=1", "evaluation={}",
                                           "batch.loader_workers=0", *overrides])


def measure_resume(args: argparse.Namespace, data_root: Path) -> dict[str, object]:
    """The `resume` section: the training batches resumed at step K and 4K."""
    config = _tiny_config(data_root)
    names = mixed_datasets(config)
    _, label_maps = merge_vocabularies(dataset_vocabularies(config.data, names))
    seconds, reread = {}, {}
    for steps in (args.resume_step, 4 * args.resume_step):
        state = WorkerState(step=0, counts=dict.fromkeys(names, 0))
        batches = build_batches(config, label_maps, state, 0, 1, torch.device("cpu"))
        for _ in range(steps):
            next(batches)
        saved = json.loads(json.dumps(state.to_json()))  # as a checkpoint keeps it
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            resumed = build_batches(config, label_maps, WorkerState.from_json(saved), 0, 1, torch.device("cpu"))
            next(resumed)
            best = min(best, time.perf_counter() - started)
        seconds[steps] = best
        # The previous resume: every stream read again from its start up to its position.
        started = time.perf_counter()
        for name in names:
            stream = train_stream(config, name, derive_seed(config.seed, "stream", name))
            collections.deque(itertools.islice(stream.raw_samples(), state.counts[name]), maxlen=0)  # read, dropped
        reread[steps] = time.perf_counter() - started
        print(f"resume at step {steps}: {seconds[steps]:.3f} s (reading again: {reread[steps]:.3f} s)", file=sys.stderr)
    k, k4 = args.resume_step, 4 * args.resume_step
    return {"resume_steps": [k, k4], "resume_s": [round(seconds[k], 3), round(seconds[k4], 3)],
            "resume_ratio": round(seconds[k4] / seconds[k], 2), "reread_s": [round(reread[k], 3), round(reread[k4], 3)]}


def measure_wait(args: argparse.Namespace, data_root: Path) -> dict[str, object]:
    """The `wait` section: the share of a tiny run's wall time spent waiting for batches."""
    share, step_s = {}, {}
    for workers in (0, 1):
        config = _tiny_config(data_root, f"steps={args.wait_steps}", f"batch.loader_workers={workers}",
                              "optimizer.warmup_steps=5")
        parts, state = build_parts(config, 0, 1, torch.device("cpu"))
        started = time.perf_counter()
        train_loop(parts, state)
        wall = time.perf_counter() - started
        share[f"workers_{workers}"] = round(state.seconds["data"] / wall, 3)
        step_s[f"workers_{workers}"] = round(wall / args.wait_steps, 3)
        print(f"wait with {workers} loader workers: {share[f'workers_{workers}']:.1%} of {wall:.1f} s", file=sys.stderr)
    return {"wait_steps": args.wait_steps, "data_wait_share": share, "step_s": step_s}


SECTIONS = ("readers", "convert", "clips", "resume", "wait")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--images", type=int, default=200, help="readers: COCO train images to generate")
    parser.add_argument("--height", type=int, default=384, help="readers: image height")
    parser.add_argument("--width", type=int, default=512, help="readers: image width")
    parser.add_argument("--crop", type=int, default=384, help="readers: square training crop")
    parser.add_argument("--samples-per-shard", type=int, default=64, help="readers")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="readers: DataLoader workers")
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement (best is kept)")
    parser.add_argument("--clips", type=int, default=8, help="clips: COCO images and VIPSeg videos made")
    parser.add_argument("--clip-height", type=int, default=736, help="clips: synthetic source height")
    parser.add_argument("--clip-width", type=int, default=1280, help="clips: synthetic source width")
    parser.add_argument("--resume-step", type=int, default=250, help="resume: K, the earlier of the two steps")
    parser.add_argument("--wait-steps", type=int, default=60, help="wait: training steps per run")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one core for the measured process; loader processes take the other
    results: dict[str, object] = {"benchmark": "bench_data", "torch_threads": 1}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if {"readers", "convert"} & set(args.sections):
            src, synth_s = coco_source(args, tmp)
        if "readers" in args.sections:
            results |= measure_readers(args, src, synth_s, tmp / "readers")
        if "convert" in args.sections:
            results |= convert_speed(src, tmp / "convert", repeats=args.repeats)
        if "clips" in args.sections:
            results |= measure_clips(args, tmp / "clips")
        if {"resume", "wait"} & set(args.sections):
            prepare_data(_tiny_config(tmp / "tiny").data)
        if "resume" in args.sections:
            results |= measure_resume(args, tmp / "tiny")
        if "wait" in args.sections:
            results |= measure_wait(args, tmp / "tiny")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
