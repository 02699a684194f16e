"""Start the MLflow UI on a study's tracking store: `omgseg ui STUDY_DIR [--port N] [--host H]`.

It binds 127.0.0.1 unless told otherwise (a tracking store holds every run's parameters and
artifacts: it is not for the open network by default), prints the URL of the study's parent
run, and runs until interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from omgseg.platform.records import StudyState


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_command(study_dir: Path, host: str, port: int) -> tuple[list[str], str, StudyState]:
    """The `mlflow ui` command for a study, its parent run's URL, and the study state."""
    state = StudyState.read(Path(study_dir))
    uri = state.tracking_uri
    if uri.startswith(("http://", "https://")):
        raise ValueError(f"the study tracks to the server {uri}: open its UI there instead")
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise FileNotFoundError("the mlflow command is not installed next to this Python")
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    return command, f"http://{host}:{port}/#/experiments", state


def main(argv: list[str] | None = None, prog: str = "omgseg ui") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Start the MLflow UI on a study's tracking store.")
    parser.add_argument("study_dir", nargs="?", default="outputs/studies/default", help="study folder (default: the default study)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000; 0 picks a free one)")
    args = parser.parse_args(argv)
    try:
        port = args.port or free_port(args.host)
        command, url, state = ui_command(Path(args.study_dir), args.host, port)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"MLflow UI for study {state.name!r}: {url} (parent run {state.parent_run_id}); Ctrl-C stops it",
          flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(prog="ui.py"))
