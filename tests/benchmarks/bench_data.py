"""Benchmark: the shard reader against reading COCO panoptic files directly.

Both paths decode the same images and id maps into `ClipSample`s and apply the same
`ClipTransform`; they differ only in where the bytes come from: sequential reads of a few
tar shards, or one JPEG, one PNG and a parsed JSON record per image (as detectron2-style
loaders do). Each path runs a full pass with 0 and with 2 DataLoader workers, interleaved,
best of `--repeats`, once with the files in the page cache ("warm") and once after dropping
them from it with posix_fadvise ("cold", i.e. read from the disk). A read-only pass (bytes,
no decoding) of both layouts, cold, shows the I/O difference on its own. `omgseg convert` with
2 worker processes against 1 on the same source gives `convert_speedup` and
`convert_identical` (the two wrote the same bytes). Prints one JSON line.

    python tests/benchmarks/bench_data.py --images 200 --height 384 --width 512
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
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

    manifests = [replace(read_manifest(out / f"w{w}"), created="") for w in best]
    return {
        "convert_samples_per_shard": samples_per_shard,
        "convert_w1_s": round(best[1], 2),
        "convert_w2_s": round(best[2], 2),
        "convert_speedup": round(best[1] / best[2], 2),
        "convert_identical": written(out / "w1") == written(out / "w2") and manifests[0] == manifests[1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="COCO train images to generate")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--crop", type=int, default=384, help="square training crop")
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="passes per path and worker count (best is kept)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the comparison is of loaders, one core each
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        sizes = SynthSizes(height=args.height, width=args.width, coco_train=args.images, coco_val=1,
                           ade_train=1, ade_val=1, video_train=1, video_val=1)
        t0 = time.perf_counter()
        src = write_synthetic(tmp / "synth", formats=["coco-panoptic"], seed=0, sizes=sizes, progress=False)["coco-panoptic"]
        synth_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        convert("coco-panoptic", src, tmp / "shards", split="train",
                samples_per_shard=args.samples_per_shard, progress=False)
        convert_s = time.perf_counter() - t0

        results_convert = convert_speed(src, tmp / "convert")
        transform = ClipTransform(crop_size=(args.crop, args.crop))
        shard_files = sorted((tmp / "shards").glob("*.tar"))
        direct_files = [src / "annotations" / "panoptic_train2017.json"]
        direct_files += sorted((src / "train2017").iterdir()) + sorted((src / "annotations" / "panoptic_train2017").iterdir())
        shard_mb = folder_bytes(shard_files) / 1e6
        direct_mb = folder_bytes(direct_files) / 1e6

        results: dict[str, object] = {
            "benchmark": "bench_data",
            "images": args.images,
            "image_size": [args.height, args.width],
            "crop": args.crop,
            "shards": len(shard_files),
            "shard_mb": round(shard_mb, 2),
            "direct_mb": round(direct_mb, 2),
            "direct_files": len(direct_files),
            "synth_s": round(synth_s, 2),
            "convert_s": round(convert_s, 2),
            "torch_threads": 1,
            **results_convert,
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
        print(json.dumps(results))


if __name__ == "__main__":
    main()
