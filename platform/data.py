"""Make a config's data sets ready to stream: synthetic sources generated and every
(dataset, split) converted to shards, both cached so a second run does no work."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from omgseg.datasets.convert import convert
from omgseg.datasets.heldout import HeldOut
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


def prepare_data(config: DataConfig, splits: Mapping[str, Iterable[str]] | None = None,
                 progress: bool = False) -> dict[str, dict[str, Path | str]]:
    """Shard locations of the (data set, split) pairs a run reads ({data set: splits}, as a
    config's `splits_read()` gives them; None: both splits of every data set): {data set:
    {split: absolute path or URL}}. Each shard folder is converted once, however many data
    sets share it (`DataConfig.shard_dir`); data sets with `shards` are only checked: their
    manifests must be readable. Every val split read must hold annotated samples. `progress`:
    bars on a terminal; one line at the end otherwise (a log file, CI)."""
    started = time.perf_counter()
    if splits is None:
        splits = {name: ("train", "val") for name in config.datasets}
    wanted = {name: sorted(set(s)) for name, s in splits.items()}
    bars = progress and sys.stderr.isatty()
    out = _prepare(config, wanted, bars)
    _check_annotated(config, out)
    if progress and not bars:
        folders = len({str(d) for dirs in out.values() for d in dirs.values()})
        print(f"[omgseg] data ready: {folders} shard folders for {len(out)} data sets under {config.root} "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return out


def _prepare(config: DataConfig, splits: dict[str, list[str]], progress: bool) -> dict[str, dict[str, Path | str]]:
    specs = {name: config.datasets[name] for name in splits}
    synthetic: dict[str, Path] = {}
    planted: dict[str, Path] = {}
    if any(spec.src is None and spec.shards is None and spec.variant is None for spec in specs.values()):
        synthetic = ensure_synthetic(config.synth_dir(), config.synth_seed, progress)
    for pset in dict.fromkeys(planted_set(spec.variant) for spec in specs.values() if spec.variant is not None):
        folder = config.synth_dir().with_name(pset.folder(config.synth_seed))
        planted.update(ensure_synthetic(folder, config.synth_seed, progress, planted=pset))
    out: dict[str, dict[str, Path | str]] = {}
    done: set[str] = set()
    for name, spec in specs.items():
        for split in splits[name]:
            shard_dir = config.shard_dir(name, split)
            out.setdefault(name, {})[split] = shard_dir
            if str(shard_dir) in done:
                continue
            done.add(str(shard_dir))
            if spec.shards is not None:
                read_manifest(shard_dir)  # raises naming the location when it cannot be read
                continue
            src = spec.src if spec.src is not None else planted[spec.variant] if spec.variant else synthetic[spec.format]
            heldout = HeldOut(**spec.val_from_train.model_dump()) if spec.val_from_train is not None else None
            convert(spec.format, src, shard_dir, split, spec.samples_per_shard, spec.clip_length, heldout=heldout,
                    workers=config.convert_workers, progress=progress)
    return out


def _check_annotated(config: DataConfig, dirs: dict[str, dict[str, Path | str]]) -> None:
    """Every val split read holds a sample with a segment: a metric on none would be empty."""
    for name, splits in dirs.items():
        if "val" not in splits or read_manifest(splits["val"]).annotated_samples > 0:
            continue
        fix = (f"give data.datasets.{name}.shards a labelled val split" if config.datasets[name].shards is not None
               else f"set data.datasets.{name}.val_from_train (a fraction or a count of train images or videos "
               "held out as val)")
        raise ValueError(f"data set {name!r}: its val shards at {splits['val']} hold no annotated sample, so nothing "
                         f"could be measured on them; {fix}")
