"""The Python examples of docs/integrations.md run as written (they need the ``fwdgrad[hf]`` extra)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_its_examples() -> None:
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_integration_example_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"docs/integrations.md[python block {index}]", "exec"), {"__name__": "__doc__"})
