"""Local servers in tests: a free loopback port, waiting until a server answers, and a shard
server whose transfers can be cut."""

import http.server
import socket
import subprocess
import threading
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


class ShardServer:
    """A folder served over HTTP from a thread of this process, whose shard transfers can be
    made to fail: `cut_next(n, then_stop)` ends the n-th next `.tar` response halfway through,
    as a server that dies mid-transfer does; with `then_stop` the server is then gone
    (connections refused), without it the server goes on serving (a restart)."""

    def __init__(self, folder) -> None:
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args) -> None:
                pass

            def copyfile(self, source, outputfile) -> None:
                if not self.path.endswith(".tar") or not server._take_cut():
                    return super().copyfile(source, outputfile)
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                outputfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                if server._stop_after_cut:
                    threading.Thread(target=server.stop, daemon=True).start()

        self._lock = threading.Lock()
        self._countdown: int | None = None
        self._stop_after_cut = False
        self.cuts: list[str] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    def cut_next(self, n: int = 1, then_stop: bool = False) -> None:
        with self._lock:
            self._countdown, self._stop_after_cut = n, then_stop

    def _take_cut(self) -> bool:
        with self._lock:
            if self._countdown is None:
                return False
            self._countdown -= 1
            if self._countdown > 0:
                return False
            self._countdown = None
            self.cuts.append(time.strftime("%H:%M:%S"))
            return True

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._httpd.server_close()
