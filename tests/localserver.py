"""Local servers in tests: a free loopback port, and waiting until a server answers."""

import socket
import subprocess
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, what: str, seconds: float = 120, process: subprocess.Popen | None = None) -> None:
    """Return once `url` answers; fail the test naming `what` if it does not within `seconds`,
    or as soon as `process` (the server, when the test started it) has exited."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if process is not None and process.poll() is not None:
                pytest.fail(f"{what} exited (code {process.returncode}) before it answered at {url}")
            if time.time() > deadline:
                pytest.fail(f"{what} did not answer at {url} within {seconds:.0f} s")
            time.sleep(0.5)
