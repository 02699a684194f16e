"""Make a config's data sets ready to stream: synthetic sources generated and every
(dataset, split) converted to shards, both cached so a second run does no work."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from omgseg.datasets.convert import convert
from omgseg.datasets.manifest import read_manifest
from omgseg.datasets.planted import PlantedSet, planted_set, write_planted
from omgseg.datasets.synth import SYNTH_FORMATS, write_synthetic
from omgseg.platform.config import DataConfig

_SYNTH_INDEX = "synth.json"


def ensure_synthetic(target: Path, seed: int, progress: bool = False, planted: PlantedSet | None = None) -> dict[str, Path]:
    """The synthetic sources under `target`, generated once: every format's ({format: folder}),
    or with `planted` every data set of that planted set ({variant: folder}).

    Generation goes to a sibling folder that is renamed into place when complete, so an
    interrupted run never leaves a half-written source that later looks finished.
    """
    index = target / _SYNTH_INDEX
    if not index.is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if planted is not None:
            written = write_planted(partial, planted.variants, seed=seed, progress=progress)
        else:
            written = write_synthetic(partial, formats=SYNTH_FORMATS, seed=seed, progress=progress)
        relative = {name: str(Path(path).relative_to(partial)) for name, path in written.items()}
        (partial / _SYNTH_INDEX).write_text(json.dumps(relative, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
    return {name: target / rel for name, rel in json.loads(index.read_text()).items()}


def prepare_data(config: DataConfig, progress: bool = False) -> dict[str, dict[str, Path]]:
    """Shard locations of every dataset and split: {dataset name: {split: absolute path or URL}}.
    Data sets with `shards` are only checked: their manifests must be readable. `progress`:
    bars on a terminal; one line at the end otherwise (a log file, CI)."""
    started = time.perf_counter()
    bars = progress and sys.stderr.isatty()
    out = _prepare(config, bars)
    if progress and not bars:
        print(f"[omgseg] data ready: {len(out)} data sets x {len(config.splits)} splits under {config.root} "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return out


def _prepare(config: DataConfig, progress: bool) -> dict[str, dict[str, Path]]:
    synthetic: dict[str, Path] = {}
    planted: dict[str, Path] = {}
    if any(spec.src is None and spec.shards is None and spec.variant is None for spec in config.datasets.values()):
        synthetic = ensure_synthetic(config.synth_dir(), config.synth_seed, progress)
    for pset in dict.fromkeys(planted_set(spec.variant) for spec in config.datasets.values() if spec.variant is not None):
        folder = config.synth_dir().with_name(pset.folder(config.synth_seed))
        planted.update(ensure_synthetic(folder, config.synth_seed, progress, planted=pset))
    out: dict[str, dict[str, Path | str]] = {}
    for name, spec in config.datasets.items():
        for split in config.splits:
            shard_dir = config.shard_dir(name, split)
            if spec.shards is not None:
                read_manifest(shard_dir)  # raises naming the location when it cannot be read
            else:
                src = spec.src if spec.src is not None else planted[spec.variant] if spec.variant else synthetic[spec.format]
                convert(spec.format, src, shard_dir, split, spec.samples_per_shard, spec.clip_length, progress)
            out.setdefault(name, {})[split] = shard_dir
    return out
