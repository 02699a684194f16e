"""What a user sees: one progress display and one line per event; everything else in log files.

Libraries (Ray, Train, Tune, open_clip, MLflow) and workers write a lot; a run's own output
goes to log files named at the start, and the console shows only progress, results and
errors, each error as one line with the path of the full log.

- `redirect_output(path)`: this process's stdout and stderr (the file descriptors, so C++
  logs too) appended to `path` while the block runs.
- `ProgressFile` / `follow_progress`: rank 0 appends JSON lines to a file; the driver follows
  it and draws one bar (a terminal) or prints one line per event (a log, CI).
- `error_line(text)`: the one line of a long error (a traceback, Ray's wrapping of it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm


class TrainingFailed(RuntimeError):
    """A training run failed; the message is one line naming the error and the full log."""


@contextlib.contextmanager
def redirect_output(path: Path) -> Iterator[Path]:
    """Append fds 1 and 2 (and sys.stdout/stderr) to `path` until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield path
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


_ERROR = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure)\b.*)$")


def error_line(text: str, limit: int = 400) -> str:
    """The last `SomeError: message` line of `text` (the root cause of a traceback, even as Ray
    wraps it), else its last non-empty line; at most `limit` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    found = [m.group(1) for line in lines for m in [_ERROR.match(line)] if m]
    chosen = found[-1] if found else (lines[-1] if lines else "unknown error")
    return chosen[:limit]


class ProgressFile:
    """Rank 0's side: one JSON object per line, flushed at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, **event) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(event) + "\n")

    def step(self, metrics: dict[str, float], step: int, steps: int) -> None:
        losses = {k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items() if k.startswith("loss/")}
        self.write(event="step", step=step, steps=steps, losses=losses, samples_per_s=round(metrics["samples_per_s"], 2))


def _describe(event: dict) -> str:
    if event.get("event") == "step":
        losses = " ".join(f"{k}={v:.3f}" for k, v in event["losses"].items())
        return f"{losses} {event['samples_per_s']:.1f} samples/s"
    return event.get("message", "")


class follow_progress:  # noqa: N801 - used as a context manager, like open()
    """The driver's side: a thread follows `path` and shows its events, as one tqdm bar on a
    terminal, or as one plain line per event (prefixed by `prefix`) when stderr is a file."""

    def __init__(self, path: Path, total: int, prefix: str = "[omgseg]", interval: float = 0.5) -> None:
        self.path = path
        self.total = total
        self.prefix = prefix
        self.interval = interval
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._offset = 0
        self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True) if self.tty else None

    def __enter__(self) -> follow_progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # the last lines
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as source:
            source.seek(self._offset)
            chunk = source.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._show(event)

    def _show(self, event: dict) -> None:
        if self._bar is not None:
            if event.get("event") == "step":
                self._bar.n = event["step"]
                self._bar.set_postfix_str(_describe(event), refresh=True)
            else:
                self._bar.write(f"{self.prefix} {_describe(event)}")
            return
        where = f"step {event['step']}/{event['steps']} " if event.get("event") == "step" else ""
        print(f"{self.prefix} {where}{_describe(event)}", file=sys.stderr, flush=True)


def say(text: str, prefix: str = "[omgseg]") -> None:
    print(f"{prefix} {text}", file=sys.stderr, flush=True)


def elapsed(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"
