"""The text of ``fwdgrad methods``: every recipe with its summary, default learning rates and a table of its
options — name, default, meaning — whose meanings come from the estimator classes' own ``Args:`` sections
(:func:`fwdgrad.estimators.registry.option_docs`), so the listing cannot drift from the docstrings.

The columns are aligned across all recipes: option names start at column 2, defaults and meanings each at
one fixed column, and a long meaning wraps onto lines indented to its column.

Example:
    >>> lines = describe(["zo"], lambda name: "sgd 0.0001, adam 0.001")
    >>> lines[0].split()[0], lines[1].strip()
    ('zo', 'default lr: sgd 0.0001, adam 0.001')
    >>> any(line.split()[:2] == ["eps", "0.001"] for line in lines)
    True
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Sequence

from fwdgrad.estimators.registry import estimator_options, option_docs, plain_text, recipe

WIDTH = 118  # characters per line of the listing
HIDDEN = ("generator",)  # options that cannot be given on the command line (a torch.Generator object)


def summary(name: str) -> str:
    """The first sentence of the docstring of recipe ``name``'s class, as plain text."""
    doc = inspect.getdoc(recipe(name).cls) or ""
    first = doc.split("\n\n")[0]
    return plain_text(first)


def _default_text(value: object) -> str:
    return "(required)" if value is inspect.Parameter.empty else repr(value)


def option_rows(name: str) -> list[tuple[str, str, str]]:
    """``(option, default, meaning)`` for every option of recipe ``name`` a user can set (presets applied);
    a meaning no docstring gives reads ``(undocumented)``."""
    opts = estimator_options(name)
    if opts is None:
        return [("**kwargs", "", "any keyword the class accepts")]
    docs = option_docs(name)
    return [(k, _default_text(v), docs.get(k, "(undocumented)")) for k, v in opts.items() if k not in HIDDEN]


def describe(names: Sequence[str], lr_text: Callable[[str], str]) -> list[str]:
    """The lines of the listing for recipes ``names``; ``lr_text(name)`` says its default learning rates."""
    rows = {n: option_rows(n) for n in names}
    key_w = max([len("option")] + [len(r[0]) for rs in rows.values() for r in rs])
    val_w = max([len("default")] + [len(r[1]) for rs in rows.values() for r in rs])
    name_w = max(len(n) for n in names) if names else 0
    meaning_col = 2 + key_w + 2 + val_w + 2
    lines: list[str] = []
    for n in names:
        head = textwrap.wrap(summary(n), WIDTH - name_w - 2) or [""]
        lines.append(f"{n:<{name_w}}  {head[0]}")
        lines.extend(" " * (name_w + 2) + more for more in head[1:])
        lines.append(f"{'':<{name_w}}  default lr: {lr_text(n)}")
        if not rows[n]:
            lines.append("  (no options)")
        for key, value, meaning in rows[n]:
            wrapped = textwrap.wrap(meaning, max(20, WIDTH - meaning_col)) or [""]
            lines.append(f"  {key:<{key_w}}  {value:<{val_w}}  {wrapped[0]}")
            lines.extend(" " * meaning_col + more for more in wrapped[1:])
        lines.append("")
    return lines


__all__ = ["describe", "option_rows", "summary"]
