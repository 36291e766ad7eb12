"""The package ships its type hints (PEP 561): ``py.typed`` exists beside ``__init__.py`` and the build
configuration lists it as package data, so wheels and sdists carry it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_is_shipped() -> None:
    assert (resources.files("fwdgrad") / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["fwdgrad"]
