"""The task table is the one home of a task: every entry answers for its task, and no other
module of platform/ names a task (docs/architecture.md, "Adding a task")."""

import ast
from pathlib import Path

from omgseg.core.structures import Task
from omgseg.platform.config import headline_metrics, metric_direction
from omgseg.platform.tasks import TASKS, QueryGroup, loss_groups, tasks_of
from omgseg.platform.training.batches import OBJECT_TASKS, PROMPTED_TASKS

PLATFORM = Path(__file__).resolve().parents[2] / "platform"
# Where a task may be named: its entry, the metrics, and the public input and output formats
# the entries choose from (omgseg predict's handlers and writers, the click protocol, and the
# file formats of omgseg eval, some of which are named like a task).
TASK_HOMES = {"tasks.py", "evaluation/metrics", "evaluation/predict.py", "evaluation/writers.py",
              "evaluation/clicks.py"}
FORMAT_TABLE = ("cli.py", "EVAL_FORMATS")


def _names_a_task(path: Path) -> list[str]:
    """The task enum members and task names (string constants) `path` mentions."""
    tree = ast.parse(path.read_text())
    skip = set()
    if path.relative_to(PLATFORM).as_posix() == FORMAT_TABLE[0]:
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == FORMAT_TABLE[1] for t in node.targets):
                skip |= {id(k) for k in node.value.keys}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "Task" and node.attr in Task.__members__:
            found.append(f"Task.{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in {t.value for t in Task} and id(node) not in skip:
            found.append(repr(node.value))
    return found


def test_no_module_but_the_task_table_names_a_task():
    naming = {}
    for path in sorted(PLATFORM.rglob("*.py")):
        rel = path.relative_to(PLATFORM).as_posix()
        if any(rel == home or rel.startswith(home + "/") for home in TASK_HOMES):
            continue
        if found := _names_a_task(path):
            naming[rel] = found
    assert naming == {}, f"these modules name tasks; their knowledge belongs in the task's entry: {naming}"
    assert _names_a_task(PLATFORM / "tasks.py")  # the check finds what it looks for


def test_every_entry_answers_for_its_task():
    assert set(TASKS) == set(Task)
    for task, spec in TASKS.items():
        assert spec.name == task.value and spec.headline
        assert all(spec.direction(m) == "higher" for m in spec.headline)
        assert spec.direction("no such metric") is None
    assert headline_metrics() == {t.value: list(s.headline) for t, s in TASKS.items()}
    assert metric_direction("interactive", "NoC@90") == metric_direction("vos", "J-Decay") == "lower"
    assert metric_direction("panoptic", "val_loss") == "lower" and metric_direction("panoptic", "AP") is None


def test_query_groups_come_from_the_entries():
    assert PROMPTED_TASKS == tasks_of(QueryGroup.PROMPT) == {Task.INTERACTIVE, Task.VOS}
    assert OBJECT_TASKS == set(Task) - PROMPTED_TASKS
    assert loss_groups(["vos"]) == [QueryGroup.PROMPT]
    assert loss_groups(["interactive", "panoptic"]) == [QueryGroup.OBJECT, QueryGroup.PROMPT]
