"""Output helpers shared by :mod:`fwdgrad.diagnostics` and :mod:`fwdgrad.studies`: a fresh run folder that
never reuses another run's, JSON and PNG files written atomically (through :func:`fwdgrad._io.write_atomic`,
the package's one atomic writer), and matplotlib (the optional ``plots`` extra) on demand."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from fwdgrad._io import write_atomic


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON (NaN and infinities as ``null``), written atomically."""
    return write_atomic(path, json.dumps(_finite(payload), indent=1) + "\n")


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def new_run_dir(root: str | Path, name: str | None, prefix: str) -> Path:
    """Create and return ``root/<name>`` (default ``<prefix>-<UTC time>``); an existing folder is never
    reused: ``-2``, ``-3``, ... is appended until the name is free."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    for i in range(1, 10_000):
        candidate = root / (base if i == 1 else f"{base}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"fwdgrad: no free folder name for {root / base}")


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend, or ``None`` when matplotlib (extra ``plots``) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return write_atomic(path, buf.getvalue())


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats printed with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
