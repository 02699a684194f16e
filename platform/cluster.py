"""Connecting to Ray: a local instance on this machine, or the cluster in $RAY_ADDRESS.

On a cluster the driver builds the project's wheel and ships its package tree (`omgseg/`,
unpacked from the wheel) to every worker in `runtime_env={"py_modules": [...]}`, so worker
nodes need the dependencies but not the project. Never the bare source folders: a folder
named `platform` would shadow the standard library there. Not the `.whl` file itself either:
Ray pip-installs a wheel in py_modules together with all its dependencies (measured here:
6.7 GB, torch included, into every node's runtime folder, over the image's own packages).
Set OMGSEG_SHIP_WHEEL=0 when the cluster image has omgseg installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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
