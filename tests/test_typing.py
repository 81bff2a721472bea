"""The decorated tasks' types as mypy --strict sees them: what must pass
passes, and every misuse is an error on its own line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api", reason="mypy comes with the lint extra")

HERE = Path(__file__).resolve().parent / "typing"


def mypy_strict(path: Path) -> tuple[str, int]:
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--show-error-codes", "--no-error-summary", str(path)]
    )
    return out + err, status


def test_typed_tasks_pass_strict_mypy() -> None:
    out, status = mypy_strict(HERE / "tasks_ok.py")
    assert status == 0, out


def test_every_misuse_is_a_type_error_on_its_line() -> None:
    path = HERE / "tasks_bad.py"
    out, status = mypy_strict(path)
    assert status == 1, out
    marked = {
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.rstrip().endswith("# E")
    }
    flagged = {int(match) for match in re.findall(rf"{re.escape(path.name)}:(\d+): error", out)}
    assert flagged == marked, out
