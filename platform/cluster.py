"""Connecting to Ray: a local instance on this machine, or the cluster in $RAY_ADDRESS.

On a cluster the driver builds the project's wheel and ships its package tree (`omgseg/`,
unpacked from the wheel) to every worker in `runtime_env={"py_modules": [...]}`, so worker
nodes need the dependencies but not the project. Never the bare source folders: a folder
named `platform` would shadow the standard library there. Not the `.whl` file itself either:
Ray pip-installs a wheel in py_modules together with all its dependencies (measured here:
6.7 GB, torch included, into every node's runtime folder, over the image's own packages).
Set OMGSEG_SHIP_WHEEL=0 when the cluster image has omgseg installed.

A study asks this module what one trial holds (its CPUs and GPU, or a trial slot when Ray Train
workers hold those) and how many trials the Ray it connected to can run at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omgseg.platform.config import StudyConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SLOT = "trial_slot"  # the custom Ray resource a multi-worker trial holds instead of CPUs (no Tune/Train deadlock)


def build_wheel(out_dir: Path) -> Path:
    """The project's wheel, built from this source tree with the installed setuptools."""
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no source tree at {PROJECT_ROOT} to build a wheel from: install omgseg in the "
                                f"cluster image and set OMGSEG_SHIP_WHEEL=0")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out_dir), str(PROJECT_ROOT)], capture_output=True, text=True)
    wheels = sorted(out_dir.glob("omgseg-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"building the omgseg wheel failed: {done.stderr.strip()[-1000:]}")
    return wheels[-1]


def shipped_package(wheel: Path, out_dir: Path) -> Path:
    """The wheel's `omgseg/` package tree, unpacked under `out_dir` (what py_modules ships)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(out_dir)
    package = out_dir / "omgseg"
    if not package.is_dir():
        raise RuntimeError(f"{wheel} holds no omgseg/ package")
    return package


def connect(local_resources: dict[str, float] | None = None, *, quiet: bool = False,
            log_to_driver: bool = False) -> dict:
    """ray.init for this process: the cluster at $RAY_ADDRESS (the wheel shipped unless
    OMGSEG_SHIP_WHEEL=0), else a new local instance with `local_resources` as custom
    resources. Returns {"address", "wheel"} for the record. A Ray already initialised in this
    process is used as it is. Workers' output stays in their own log files (omgseg puts them
    in the run or study folder) unless `log_to_driver`."""
    import logging

    import ray

    if ray.is_initialized():
        return {"address": "already connected", "wheel": None}
    address = os.environ.get("RAY_ADDRESS")
    level = logging.INFO if log_to_driver else logging.WARNING
    if not address:
        ray.init(resources=local_resources or None, log_to_driver=log_to_driver, logging_level=level)
        return {"address": "local", "wheel": None}
    wheel = None
    runtime_env = {}
    if os.environ.get("OMGSEG_SHIP_WHEEL", "1") != "0":
        folder = Path(tempfile.mkdtemp(prefix="omgseg-wheel-"))
        wheel = build_wheel(folder / "wheel")
        runtime_env["py_modules"] = [str(shipped_package(wheel, folder / "package"))]
    if not quiet:
        print(f"[omgseg] connecting to the Ray cluster at {address}" + (f", shipping {wheel.name}'s package" if wheel else ""),
              file=sys.stderr, flush=True)
    ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=log_to_driver, logging_level=level)
    return {"address": address, "wheel": str(wheel) if wheel else None}


def trial_resources(config: StudyConfig) -> dict[str, float]:
    """The Ray resources one trial holds: its CPUs (and GPU) when it trains in its own process;
    a trial slot when Ray Train workers hold them."""
    res = config.train.resources
    if res.workers == 1:
        return {"CPU": res.cpus_per_worker, **({"GPU": 1.0} if res.use_gpu else {})}
    return {SLOT: 1.0}


def _concurrency(config: StudyConfig, total_cpus: float, total_gpus: float) -> int:
    if config.scheduling.max_concurrent_trials:
        return config.scheduling.max_concurrent_trials
    res = config.train.resources
    by_cpu = total_cpus // (res.workers * res.cpus_per_worker)
    by_gpu = total_gpus // res.workers if res.use_gpu else by_cpu
    return max(1, int(min(by_cpu, by_gpu)))


def start_for_study(config: StudyConfig, verbose: bool) -> int:
    """Connect to $RAY_ADDRESS (omgseg.platform.cluster ships the wheel) or start a local Ray;
    returns how many trials may run at once. Multi-worker trials need `trial_slot` resources,
    which a local Ray gets and a cluster's head node must offer."""
    import ray

    local = not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    slots = _concurrency(config, float(os.cpu_count() or 1), float(_local_gpus())) if local else 0
    multi_worker = config.train.resources.workers > 1
    connect({SLOT: slots} if local and multi_worker else None, log_to_driver=verbose)
    if not multi_worker:
        res = ray.cluster_resources()
        return _concurrency(config, float(res.get("CPU", 1)), float(res.get("GPU", 0)))
    found = int(ray.cluster_resources().get(SLOT, 0))
    if found < 1:
        where = f"the Ray cluster at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "this Ray"
        raise RuntimeError(
            f"{where} has no {SLOT!r} resource: start its head node with "
            f"`ray start --head --resources='{{\"{SLOT}\": N}}'` for N concurrent trials (studies/cluster/)")
    return found


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
