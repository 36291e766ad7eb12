"""``fwdgrad methods``: every option of every recipe printed with its default and a meaning taken from the
estimator's own docstring, in columns that line up across the whole listing."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

import fwdgrad
from fwdgrad.cli import main
from fwdgrad.estimators import available_estimators, estimator_class, estimator_options
from fwdgrad.estimators.catalog import HIDDEN, option_rows
from fwdgrad.estimators.registry import option_docs


def _listing() -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["methods"]) == 0
    return out.getvalue().splitlines()


@pytest.mark.parametrize("name", available_estimators())
def test_every_option_has_a_meaning_from_the_docstrings(name: str) -> None:
    opts = estimator_options(name)
    assert opts is not None, f"{name} takes **kwargs: its options cannot be listed"
    docs = option_docs(name)
    missing = [k for k in opts if k not in docs]
    assert not missing, f"{estimator_class(name).__name__} documents no {missing} in an Args: section"
    assert all(len(docs[k].split()) >= 2 for k in opts), {k: docs[k] for k in opts}


def test_listing_prints_every_option_once_per_recipe_in_aligned_columns() -> None:
    lines = _listing()
    names = available_estimators()
    starts = [i for i, line in enumerate(lines) if line and not line.startswith(" ")]
    assert [lines[i].split()[0] for i in starts] == names
    option_lines, continuation = [], []
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        lr_line = next(j for j in range(i, end) if lines[j].split()[:2] == ["default", "lr:"])
        block = lines[lr_line + 1 : end]
        expected = [o for o in estimator_options(names[k]) if o not in HIDDEN]
        shown = [line.split()[0] for line in block if re.match(r"  \S", line)]
        assert shown == expected, names[k]
        option_lines += [line for line in block if re.match(r"  \S", line)]
        continuation += [line for line in block if line.startswith("   ")]
        for _opt, _default, meaning in option_rows(names[k]):
            assert meaning != "(undocumented)" and meaning.split()[0] in " ".join(block)
    assert option_lines and continuation
    # the default column and the meaning column start at one position on every option line
    default_cols = {len(line) - len(line[2:].split(" ", 1)[1].lstrip()) for line in option_lines}
    assert len(default_cols) == 1, default_cols
    meaning_col = {re.match(r"  \S+\s+\S.*?\s{2,}", line).end() for line in option_lines
                   if re.match(r"  \S+\s+\S.*?\s{2,}", line)}
    assert len(meaning_col) == 1, meaning_col
    col = meaning_col.pop()
    assert all(len(line) - len(line.lstrip()) == col for line in continuation)
    assert all(len(line) <= 118 for line in lines)


def test_a_preset_is_marked_in_its_recipe() -> None:
    assert option_docs("fg-w-momentum")["directions"].startswith("preset 'momentum'")
    assert not option_docs("fg-w")["directions"].startswith("preset")
    assert fwdgrad.estimator("fg-w-momentum", seed=0).directions == "momentum"
