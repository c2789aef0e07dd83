"""Reading one sysfs (or procfs, cgroupfs) attribute: the one file reader of ``metrics``.

Every source reads kernel attributes through here, below a root that tests replace with
a recorded tree (``sysfs_root``, like node_exporter's ``--path.sysfs``).
"""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path) -> str | None:
    """An attribute's text, stripped; ``None`` if it does not exist. Other ``OSError``s
    (EIO from a wedged device, EACCES) propagate: the caller decides what they mean."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def read_int(path: Path) -> int | None:
    """An integer attribute (decimal, or ``0x`` hex); ``None`` if absent or empty.
    ``ValueError`` if it holds something else."""
    text = read_text(path)
    return None if text is None or text == "" else int(text, 0)


def read_text_or_none(path: Path) -> str | None:
    """Like :func:`read_text`, but an unreadable attribute is ``None`` too (for optional
    limits, where "cannot tell" means "no limit known")."""
    try:
        return read_text(path)
    except OSError:
        return None
