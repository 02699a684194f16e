"""Every command the README and docs/ show, run as a user would: from a fresh folder, on the
tiny configs and synthetic data, checking that it exits as the text says and writes what the
text says it writes.

Commands are read from the shell code blocks of README.md, docs/*.md and
studies/cluster/README.md. Each must match exactly one rule below: RUN (run it, with the
speed-ups named in the rule appended, and check its outputs) or NOT_HERE (with the reason it
cannot or need not run here). A command the docs show that no rule knows fails the test, and so
does a rule that no doc shows any more: docs and test move together.

Slow (about 14 minutes on 2 cores): `make test-docs`, also run by CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from localserver import free_port, wait_for_http

from omgseg.platform.records import StudySummary

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "studies" / "cluster" / "README.md"]
COMMANDS = ("omgseg", "python", "make", ".venv/bin/python", "mlflow", "RAY_ADDRESS=", "ray", "kubectl")
SHELL_BLOCKS = ("", "sh", "bash", "shell", "console")

# A small plan for the studies the docs show (they take 10 to 15 minutes as written).
SMALL_STUDY = ["train_datasets=[coco,davis]", "seeds=[0,1]", "combinations=[singletons,pairs]", "train.steps=2",
               "train.eval_samples=1", "train.val_samples=2", "train.affinity.every=2",
               "train.affinity.heldout_samples=2", "train.affinity.batch_size=2",
               "evaluation={coco: [panoptic], davis: [vos]}"]
SMALL_PLANTED = ["seeds=[0,1]", "train.steps=2", "pretrain.steps=2", "train.eval_samples=1", "train.val_samples=2",
                 "train.affinity.every=2", "train.affinity.heldout_samples=2", "train.affinity.batch_size=2"]


def shown_commands() -> list[tuple[str, str]]:
    """(doc file, command) of every command line in a shell code block, continuations joined,
    trailing "  # comments" dropped; in a block with "$ " prompts, only the prompted lines
    (the others are what the command printed)."""
    found = []
    for path in DOCS:
        block = None
        prompted = False
        pending = ""
        lines = path.read_text().splitlines()
        for k, line in enumerate(lines):
            if line.startswith("```"):
                block = None if block is not None else line[3:].strip()
                if block is not None:
                    body = lines[k + 1:next(j for j in range(k + 1, len(lines)) if lines[j].startswith("```"))]
                    prompted = any(b.startswith("$ ") for b in body)
                continue
            if block not in SHELL_BLOCKS or (prompted and not line.startswith("$ ") and not pending):
                continue
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            line = re.sub(r"\s+#\s.*$", "", line.removeprefix("$ ")).strip()
            first = line.split(" ", 1)[0] if line else ""
            if any(first == c or first.startswith(c) and c.endswith("=") for c in COMMANDS):
                found.append((str(path.relative_to(ROOT)), re.sub(r"\s+", " ", line)))
    return found


@dataclass
class Rule:
    pattern: str
    reason: str = ""  # NOT_HERE: why it does not run here
    extra: list[str] = field(default_factory=list)  # RUN: arguments appended (speed-ups), named here
    check: object = None  # RUN: check(folder, done) on the finished command
    exit_code: int = 0
    server: bool = False  # RUN: a server: started, asked on 127.0.0.1, stopped

    def matches(self, command: str) -> bool:
        return re.search(self.pattern, command) is not None


def _json(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def _exists(*parts):
    return lambda folder, done: all((folder / p).exists() for p in parts) or pytest.fail(f"missing one of {parts}")


def _train_check(folder, done):
    import mlflow

    assert (folder / "outputs/runs/train_tiny/latest/model.pt").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'outputs/runs/mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("omgseg").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def _metric(key):
    return lambda folder, done: key in _json(done) or pytest.fail(f"no {key} in {done.stdout[-500:]}")


def _study_check(folder: str, planted: bool = False):
    def check(root, done):
        out = root / folder
        assert all((out / f"{t}.parquet").is_file() for t in ("runs", "metrics", "influence", "correlation", "affinity"))
        summary = StudySummary.read(out)
        assert summary.finished == summary.trials
        assert (summary.planted is not None) == planted
    return check


NOT_HERE = [
    Rule(r"RAY_ADDRESS=", "needs a Ray cluster: `make test-cluster` runs the same on a loopback two-node cluster"),
    Rule(r"^(ray|kubectl) ", "cluster recipes (studies/cluster/): need a cluster"),
    Rule(r"omgseg_paper\.yaml(?!.* --dry-run)", "the paper's study: a GPU cluster and the real data sets"),
    Rule(r"^make (test|test-slow|test-cluster|test-docs|test-all|lint|bench|install)\b",
         "the test suite, lint and benchmarks themselves"),
    Rule(r"^make study$", "the default study (10 minutes): the same script runs below with a smaller plan"),
    Rule(r"tests/benchmarks/", "a benchmark (minutes each, `make bench`): its output is in the docs and issue notes"),
    Rule(r"outputs/studies/planted(_large)?-(k\d+|sweep)|estimators\.py --recompute",
         "the measured runs behind docs/studies.md's estimator and recommendation numbers (10 to 30 minutes each)"),
    Rule(r"\[(--|key|[A-Z])|\b(FILE|DIR|CKPT|TASK|PATH|SHARD_DIR|STUDY_DIR|CONFIG|FORMAT)\b|\.\.\.|\"SQL\"",
         "a usage synopsis, with placeholders"),
]
RUN = [
    Rule(r"^omgseg synth --out outputs/synth", check=_exists("outputs/synth/coco/annotations/panoptic_val2017.json")),
    Rule(r"^omgseg convert coco-panoptic", check=_exists("outputs/shards/coco/val/manifest.json")),
    Rule(r"^omgseg shards verify", check=lambda f, d: _json(d)["ok"] or pytest.fail(d.stdout)),
    Rule(r"^omgseg shards stats", check=lambda f, d: json.loads(d.stdout)),
    Rule(r"^omgseg prepare --config studies/configs/train_tiny\.yaml$",
         check=_exists("outputs/data/shards/coco/train/manifest.json")),
    Rule(r"^omgseg prepare --config studies/configs/default\.yaml data\.synth_sed=1$", exit_code=1,
         check=lambda f, d: "data.synth_sed: unknown key" in d.stderr or pytest.fail(d.stderr)),
    Rule(r"^omgseg train --config studies/configs/train_tiny\.yaml$", check=_train_check),
    Rule(r"^omgseg predict .*--task panoptic", check=_exists("outputs/predictions/panoptic/panoptic.json")),
    Rule(r"^omgseg eval coco-panoptic", check=_exists("outputs/predictions/panoptic/eval.json")),
    Rule(r"^omgseg predict .*--task instance", check=_exists("outputs/predictions/instance/instances_results.json")),
    Rule(r"^omgseg eval coco-instances", check=_metric("AP")),
    Rule(r"^omgseg eval interactive", check=_metric("mIoU@1")),
    Rule(r"^omgseg predict .*--task video_panoptic", check=_exists("outputs/predictions/vipseg/pred.json")),
    Rule(r"^omgseg eval vipseg", check=_metric("VPQ")),
    Rule(r"^omgseg model-info tiny$", check=lambda f, d: _json(d)["parameters"]["trainable"] > 0),
    Rule(r"^python studies/cotrain_matrix\.py$", extra=SMALL_STUDY, check=_study_check("outputs/studies/default")),
    Rule(r"^python studies/cotrain_matrix\.py --resume$", extra=SMALL_STUDY,
         check=lambda f, d: "already finished" in d.stderr or pytest.fail(d.stderr)),
    Rule(r"^python studies/cotrain_matrix\.py --out outputs/studies/mine", extra=SMALL_STUDY,
         check=_study_check("outputs/studies/mine")),
    Rule(r"^python studies/cotrain_matrix\.py --config studies/configs/planted\.yaml$", extra=SMALL_PLANTED,
         check=_study_check("outputs/studies/planted", planted=True)),
    Rule(r"^python studies/cotrain_matrix\.py --config studies/configs/planted_large\.yaml$", extra=SMALL_PLANTED,
         check=_study_check("outputs/studies/planted_large", planted=True)),
    Rule(r"^python studies/cotrain_matrix\.py --config studies/configs/omgseg_paper\.yaml --dry-run$",
         check=lambda f, d: json.loads(d.stdout)["n_trials"] > 0),
    Rule(r"^python dashboards/report\.py outputs/studies/default$", extra=["--samples", "1"],
         check=_exists("outputs/studies/default/report/index.html")),
    Rule(r"^omgseg query ", check=lambda f, d: "shape:" in d.stdout or pytest.fail(d.stdout + d.stderr)),
    Rule(r"^omgseg ui outputs/studies/default$", server=True),
]


def _rule(command: str) -> Rule | None:
    """The first NOT_HERE rule that matches (a synopsis is never run), else the first RUN rule."""
    return next((r for r in NOT_HERE + RUN if r.matches(command)), None)


def test_every_shown_command_has_a_rule_and_every_rule_a_command():
    commands = shown_commands()
    unknown = [(doc, c) for doc, c in commands if _rule(c) is None]
    assert not unknown, f"commands in the docs that this test does not know: {unknown}"
    unused = [r.pattern for r in RUN if not any(r.matches(c) for _, c in commands)]
    assert not unused, f"rules no doc shows a command for any more: {unused}"


def _serve(command: str, folder: Path, env: dict) -> None:
    port = free_port()
    server = subprocess.Popen(f"{command} --port {port}", shell=True, cwd=folder, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", command, process=server)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_every_command_runs_as_the_docs_say(tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    for name in ("studies", "dashboards"):  # the repository's scripts and configs, at the paths the docs use
        (folder / name).symlink_to(ROOT / name)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    commands = list(dict.fromkeys(c for _, c in shown_commands()))
    for rule in RUN:
        for command in (c for c in commands if _rule(c) is rule):
            line = command.replace("python ", f"{shlex.quote(sys.executable)} ", 1) if command.startswith("python ") \
                else command
            line = " ".join([line, *map(shlex.quote, rule.extra)])
            if rule.server:
                _serve(line, folder, env)
                continue
            done = subprocess.run(line, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == rule.exit_code, f"{command}\nexit {done.returncode}\n{done.stderr[-3000:]}"
            if rule.check is not None:
                rule.check(folder, done)
