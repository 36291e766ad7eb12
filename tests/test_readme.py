"""The Python examples of the README, of docs/tour.md (the README's long form) and of docs/architecture.md
run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TOUR = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tour.md").read_text(), flags=re.S)
ARCHITECTURE = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "architecture.md").read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 1 and len(TOUR) >= 4


@pytest.mark.parametrize("index", range(len(TOUR)))
def test_tour_example_runs(index: int) -> None:
    exec(compile(TOUR[index], f"docs/tour.md[python block {index}]", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_architecture_examples_run_and_register_generic_recipes() -> None:
    import fwdgrad
    from fwdgrad.estimators import registry

    assert len(ARCHITECTURE) == 2
    try:
        for i, block in enumerate(ARCHITECTURE):
            exec(compile(block, f"docs/architecture.md[python block {i}]", "exec"), {"__name__": "__doc__"})
        assert {"fg-w-orthogonal-doc", "fg-sign-doc"} <= set(fwdgrad.available_estimators())
    finally:
        for name in ("fg-w-orthogonal-doc", "fg-sign-doc"):
            registry._REGISTRY.pop(name, None)


def test_own_training_loop_block_runs_every_line() -> None:
    """The README's ``## Your own training loop`` recipe runs, and every line of it runs (a line tracer
    records the executed lines of the block; blank and comment-only lines are not code)."""
    import sys

    section = README.read_text().split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    name = "README.md[your own training loop]"
    code_lines = {i for i, line in enumerate(block.splitlines(), start=1) if line.strip()
                  and not line.strip().startswith("#")}
    ran: set[int] = set()

    def tracer(frame, event, arg):  # sys.settrace calls it for every event
        if frame.f_code.co_filename == name and event == "line":
            ran.add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        exec(compile(block, name, "exec"), {"__name__": "__readme__"})
    finally:
        sys.settrace(None)
    assert code_lines - ran == set(), sorted(code_lines - ran)
