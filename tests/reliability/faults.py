"""Faults injected into real-format files, how a command is run in-process, and the contract
every run must meet (docs/reliability.md): exit 1 with one line that names the damaged file,
or exit 0 with an output the test then checks round-trips.

A `Fault` is plain data (kind, file, position, JSON path), so Hypothesis prints a failing case
in a form that can be pasted back into a test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omgseg.platform.cli import main

# Cases per fuzz test: the default suite runs DEFAULT, `make test-slow` runs MANY.
DEFAULT = "default"
MANY = "many"


def budget_params(default: int, many: int) -> list:
    """pytest params for a fuzz test's number of cases: `default` in the default suite, `many`
    under the slow marker."""
    return [pytest.param(default, id=DEFAULT), pytest.param(many, id=MANY, marks=pytest.mark.slow)]


def fuzz(strategy: st.SearchStrategy, check: Callable[[object], None], examples: int) -> None:
    """Run `check` on `examples` seeded draws of `strategy` (same cases on every run)."""

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(strategy)
    def run(case: object) -> None:
        check(case)

    run()


# A name that is not valid UTF-8, as os.listdir returns it (surrogate escapes).
NON_UTF8 = os.fsdecode(b"\xff\xfe-frame")
RETYPED = (None, "x", -1, 0, 1.5, [], {}, True, 2**40, NON_UTF8)


@dataclass(frozen=True)
class Fault:
    """One change to one file under a root folder.

    kind: truncate (keep the first `at` fraction), flip (one bit at `at`), empty (0 bytes),
        delete, garbage (bytes appended), copy (a second copy named `new_name` next to it),
        rename (to `new_name`), json-drop / json-retype / json-dup (the element at
        `json_path`: removed, replaced by `value`, or, in a list, repeated); member-drop,
        member-truncate, member-flip, member-json (tar member number `member` removed, cut,
        flipped or, a sample header, edited as above), the tar rewritten as a valid tar.
    """

    kind: str
    target: str
    at: float = 0.0
    bit: int = 0
    json_path: tuple = ()
    value: object = None
    new_name: str = ""
    member: int = 0

    def apply(self, root: Path) -> None:
        path = root / self.target
        if self.kind.startswith("member-"):
            self._apply_to_member(path)
        elif self.kind == "delete":
            path.unlink()
        elif self.kind == "empty":
            path.write_bytes(b"")
        elif self.kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * self.at)])
        elif self.kind == "flip":
            data = bytearray(path.read_bytes())
            if data:
                data[min(int(len(data) * self.at), len(data) - 1)] ^= 1 << self.bit
            path.write_bytes(bytes(data))
        elif self.kind == "garbage":
            path.write_bytes(path.read_bytes() + b"\x00garbage\xff" * 8)
        elif self.kind == "copy":
            shutil.copyfile(path, path.with_name(self.new_name))
        elif self.kind == "rename":
            path.rename(path.with_name(self.new_name))
        elif self.kind.startswith("json-"):
            doc = json.loads(path.read_bytes())
            path.write_text(json.dumps(_edit(doc, self.kind, self.json_path, self.value)))
        else:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def _apply_to_member(self, path: Path) -> None:
        members = tar_members(path)
        name, data = members[self.member % len(members)]
        if self.kind == "member-drop":
            data = None
        elif self.kind == "member-truncate":
            data = data[: int(len(data) * self.at)]
        elif self.kind == "member-flip":
            flipped = bytearray(data)
            if flipped:
                flipped[min(int(len(data) * self.at), len(data) - 1)] ^= 1 << self.bit
            data = bytes(flipped)
        else:
            data = json.dumps(_edit(json.loads(data), "json-" + self.kind.split("-")[-1], self.json_path,
                                    self.value)).encode()
        samples: dict[str, dict] = {}
        for member_name, content in members:
            key, field = member_name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[field] = data if member_name == name else content
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as writer:
            for sample in samples.values():
                writer.write({k: v for k, v in sample.items() if v is not None})

    @property
    def file_name(self) -> str:
        return Path(self.target).name


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _edit(doc: object, kind: str, path: tuple, value: object) -> object:
    if not path:
        return value if kind == "json-retype" else doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if kind == "json-drop":
        del parent[last]
    elif kind == "json-retype":
        parent[last] = value
    elif kind == "json-dup" and isinstance(parent, list):
        parent.insert(last, json.loads(json.dumps(parent[last])))
    elif kind == "json-dup":  # in an object: the value repeated under a second key
        parent[f"{last}_copy"] = parent[last]
    return doc


def json_paths(doc: object, prefix: tuple = (), depth: int = 6) -> Iterator[tuple]:
    """Paths to the elements of a JSON document: every key, and the first two and last
    items of each list (polygons and RLE counts are long and alike)."""
    if depth == 0:
        return
    if isinstance(doc, dict):
        children = list(doc.items())
    elif isinstance(doc, list):
        picks = sorted({0, 1, len(doc) - 1} & set(range(len(doc))))
        children = [(i, doc[i]) for i in picks]
    else:
        return
    for key, child in children:
        yield (*prefix, key)
        yield from json_paths(child, (*prefix, key), depth - 1)


FILE_KINDS = ("truncate", "flip", "flip", "empty", "delete", "garbage", "copy", "rename")
JSON_KINDS = ("json-drop", "json-retype", "json-retype", "json-dup")


MEMBER_KINDS = ("member-drop", "member-truncate", "member-flip", "member-flip", "member-json", "member-json")


def faults(root: Path, files: Sequence[str], kinds: Sequence[str] = FILE_KINDS,
           new_names: Sequence[str] = (NON_UTF8, "99999", "zz")) -> st.SearchStrategy[Fault]:
    """Faults on `files` (paths relative to `root`, which is read here and never changed);
    JSON files also get edits of their fields, tar files edits of their members. Copies and
    renames take one of `new_names` plus the file's suffix."""
    docs: dict[str, list[tuple]] = {}
    members: dict[str, list[tuple[str, bytes]]] = {}

    def members_of(target: str) -> list[tuple[str, bytes]]:
        if target not in members:
            members[target] = tar_members(root / target)
        return members[target]

    def paths_of(target: str) -> list[tuple]:
        if target not in docs:
            docs[target] = list(json_paths(json.loads((root / target).read_bytes())))
        return docs[target]

    @st.composite
    def draw(draw_: st.DrawFn) -> Fault:
        target = draw_(st.sampled_from(sorted(files)))
        is_json = target.endswith(".json")
        extra = JSON_KINDS * 2 if is_json and paths_of(target) else MEMBER_KINDS if target.endswith(".tar") else ()
        kind = draw_(st.sampled_from([*kinds, *extra]))
        suffix = Path(target).suffix
        if kind.startswith("member-"):
            number = draw_(st.integers(0, len(members_of(target)) - 1))
            name, data = members_of(target)[number]
            if kind == "member-json" and not name.endswith(".json"):
                kind = "member-flip"
            if kind == "member-json":
                edit = draw_(st.sampled_from(["drop", "retype", "retype", "dup"]))
                json_path = draw_(st.sampled_from(list(json_paths(json.loads(data)))))
                value = draw_(st.sampled_from(RETYPED)) if edit == "retype" else None
                return Fault(f"member-json-{edit}", target, json_path=json_path, value=value, member=number)
            return Fault(kind, target, at=draw_(st.floats(0.0, 0.999)), bit=draw_(st.integers(0, 7)), member=number)
        if kind.startswith("json-"):
            json_path = draw_(st.sampled_from(paths_of(target)))
            value = draw_(st.sampled_from(RETYPED)) if kind == "json-retype" else None
            return Fault(kind, target, json_path=json_path, value=value)
        if kind in ("copy", "rename"):
            name = draw_(st.sampled_from([n + suffix for n in new_names]))
            return Fault(kind, target, new_name=name)
        return Fault(kind, target, at=draw_(st.floats(0.0, 0.999)), bit=draw_(st.integers(0, 7)))

    return draw()


@contextmanager
def damaged_copy(clean: Path, fault: Fault, work: Path, name: str = "in") -> Iterator[Path]:
    """A copy of `clean` under a fresh folder in `work`, with `fault` applied; the folder (and
    whatever the command wrote next to the copy) is removed afterwards."""
    case = Path(tempfile.mkdtemp(dir=work))
    try:
        folder = case / name
        shutil.copytree(clean, folder)
        fault.apply(folder)
        yield folder
    finally:
        shutil.rmtree(case, ignore_errors=True)


def fault_names(fault: Fault) -> list[str]:
    """The names an error about `fault` may use: the damaged file, or the name it was given."""
    return [n for n in (fault.file_name, fault.new_name) if n]


def files_under(root: Path, keep: Callable[[str], bool] = lambda rel: True) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and keep(str(p.relative_to(root))))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        return self.err.strip().splitlines()[-1] if self.err.strip() else ""


def run_cli(argv: Sequence[str]) -> Outcome:
    """`omgseg <argv>` in this process; stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exn:  # argparse usage errors
            code = exn.code
    return Outcome(int(code or 0), out.getvalue(), err.getvalue())


def assert_one_line_error(outcome: Outcome, command: str, names: Sequence[str], case: object) -> None:
    """Exit 1, no traceback, exactly one error line (progress bars aside), the last, naming
    one of `names`."""
    assert outcome.code == 1, f"{case}: exit {outcome.code}\n{outcome.err[-3000:]}"
    assert "Traceback" not in outcome.err, f"{case}:\n{outcome.err[-3000:]}"
    errors = [line for line in outcome.err.splitlines() if line.startswith(f"omgseg {command}: error: ")]
    assert len(errors) == 1 and outcome.error_line == errors[0], f"{case}: stderr:\n{outcome.err[-3000:]}"
    assert any(name in errors[0] for name in names), f"{case}: the error names none of {list(names)}: {errors[0]}"
