"""The loopback setup of the scale-out tests: a two-node Ray cluster (`ray start --head` and
`ray start --address`, 1 CPU each), shards on an HTTP server (tests/localserver.py) and
`mlflow server` on SQLite, all on 127.0.0.1, every one stopped afterwards, pass or fail.
The MLflow server can be stopped and started again on the same port and store, and the
second Ray node killed as a machine is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from localserver import ShardServer, free_port, wait_for_http

BIN = Path(sys.executable).parent
WORKER_NODE = "worker_node"  # a resource only the second node has, so that a test can find its processes


class MlflowServer:
    """`mlflow server` on a SQLite store in `folder`; stop() and start() keep port and store."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                         "--artifacts-destination", str(folder / "server-artifacts"), "--host", "127.0.0.1",
                         "--port", str(self.port), "--workers", "1"]
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for_http(f"{self.url}/health", "the MLflow server", process=self._process)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None


def stop_process(process: subprocess.Popen) -> None:
    try:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def ray_command(*args: str, env: dict) -> None:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


@dataclass
class Services:
    ray: str  # the head's address, for RAY_ADDRESS
    shards: ShardServer  # serves the data root's shards/ folder
    mlflow: MlflowServer
    env: dict  # the environment the Ray nodes run with

    def study_env(self) -> dict:
        return {**self.env, "RAY_ADDRESS": self.ray, "MLFLOW_TRACKING_URI": self.mlflow.url}

    def worker_node_outputs(self) -> set[Path]:
        """The files the second node's processes write their stdout to (a trial's log)."""
        outputs = set()
        for pid in _worker_node_pids():
            try:
                outputs.add(Path(os.readlink(f"/proc/{pid}/fd/1")))
            except OSError:
                continue
        return outputs

    def kill_worker_node(self) -> int:
        """SIGKILL the second node's raylet and every process attached to it, with no warning,
        as when its machine is lost; returns how many processes were killed."""
        victims = _worker_node_pids()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):  # exited on its own meanwhile
                os.kill(pid, signal.SIGKILL)
        return len(victims)


def _worker_node_pids() -> list[int]:
    """The second node's raylet and its descendants (the workers it started; Ray retitles them,
    so they are found by parent, not by command line)."""
    commands = dict(_commands())
    raylets = [pid for pid, args in commands.items() if args and args[0].endswith("/raylet")
               and any(a.startswith("--static_resource_list=") and f"{WORKER_NODE}," in a for a in args)]
    if len(raylets) != 1:
        raise RuntimeError(f"expected one raylet with the {WORKER_NODE} resource, found {len(raylets)}")
    parents = {pid: _parent(pid) for pid in commands}
    found = set(raylets)
    while grown := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= grown
    return sorted(found)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _commands():
    """(pid, argv) of every process this user can read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue


@contextmanager
def loopback_services(tmp_path: Path, shard_root: Path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    shards = ShardServer(shard_root)
    mlflow = MlflowServer(tmp_path)
    ray_started = False
    try:
        mlflow.start()
        port = free_port()
        ray_started = True
        ray_command("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                    "--resources", json.dumps({"trial_slot": 1}), "--disable-usage-stats", env=env)
        ray_command("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                    "--resources", json.dumps({WORKER_NODE: 1}), "--disable-usage-stats", env=env)
        yield Services(ray=f"127.0.0.1:{port}", shards=shards, mlflow=mlflow, env=env)
    finally:
        if ray_started:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=300)
        mlflow.stop()
        shards.stop()
