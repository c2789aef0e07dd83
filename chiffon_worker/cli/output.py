"""How every ``chiffon`` command writes its output: one line helper, one table renderer.

Command output goes to stdout through :func:`emit` (flushed, so ``--watch`` refreshes and
piped readers see each line at once); diagnostics go through :mod:`logging`, and errors
are printed by :func:`chiffon_worker.cli.main`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

#: How a missing value is shown in a table cell.
MISSING = "-"


def emit(text: str = "", *, end: str = "\n") -> None:
    """Write ``text`` and ``end`` to stdout and flush."""
    sys.stdout.write(text + end)
    sys.stdout.flush()


def json_array(items: Iterable[str]) -> str:
    """A compact JSON array of ``items``, each already the JSON text of one element."""
    return "[" + ",".join(items) + "]"


def format_value(value: Any) -> str:
    """A table cell: ``-`` for None, floats in ``%g`` form, anything else as ``str()``."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_age(seconds: float) -> str:
    """A short human duration: ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    total = int(max(0.0, seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, cells through :func:`format_value`;
    trailing blanks are stripped from every line."""
    cells = [[format_value(value) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)])
              for i, header in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join("  ".join(cell.ljust(width)
                               for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
