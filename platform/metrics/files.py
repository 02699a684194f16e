"""Reading the result and ground-truth files the evaluators take, with errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
