"""``chiffon history``: an agent's history as terminal sparklines, or a PNG via matplotlib.

Sparklines are time-bucketed: each character covers an equal slice of the time span and
shows the mean of the points in it (blank where there were none, e.g. while the agent
was offline); with fewer points than columns, the chart is as wide as the point count.
Each row is scaled from 0 to its own maximum.

The PNG has wall-clock time on its x-axis, shades the stretches where the agent sent
nothing for more than :data:`OFFLINE_INTERVALS` of its heartbeat intervals (its lines
break there), and draws each series from 0 to the machine's total (cores, memory, VRAM;
load against the cores), or to the series' own maximum where that is higher.
"""

from __future__ import annotations

import importlib
import itertools
import operator
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from chiffon_worker.cli.output import format_age
from chiffon_worker.errors import ChiffonError, MissingExtra
from chiffon_worker.snapshot import HISTORY_FIELDS

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import HistoryPoint

BLOCKS = "▁▂▃▄▅▆▇█"

#: (label, unit as written after a number, value of a point): one per history field of
#: the snapshot declaration, in its order.
SERIES: tuple[tuple[str, str, Callable[[HistoryPoint], float]], ...] = tuple(
    (field.label, field.unit_suffix, operator.attrgetter(field.name))
    for field in HISTORY_FIELDS)
#: The field holding the machine's total of each series (a need's total; load: cores).
TOTALS: tuple[str, ...] = tuple(field.need.total if field.need else "cpu_cores_physical"
                                for field in HISTORY_FIELDS)
#: A silence longer than this many heartbeat intervals is shaded as offline.
OFFLINE_INTERVALS = 2.5


def offline_spans(times: Sequence[float], interval_seconds: float
                  ) -> list[tuple[float, float]]:
    """(from, to) of each silence between consecutive points longer than
    ``OFFLINE_INTERVALS`` heartbeat intervals (unix seconds)."""
    limit = interval_seconds * OFFLINE_INTERVALS
    return [(earlier, later) for earlier, later in itertools.pairwise(times)
            if later - earlier > limit]


def broken_at_gaps(times: Sequence[float], values: Sequence[float],
                   gaps: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``times`` and ``values`` with a NaN point inside each gap, so a plotted line breaks
    there instead of bridging the silence."""
    starts = {start for start, _ in gaps}
    xs: list[float] = []
    ys: list[float] = []
    for moment, value in zip(times, values, strict=True):
        xs.append(moment)
        ys.append(value)
        if moment in starts:
            xs.append(moment)
            ys.append(float("nan"))
    return xs, ys


def y_top(values: Sequence[float], total: float | None) -> float:
    """Where a series' y-axis ends: the machine's ``total``, or the values' maximum where
    that is higher (1 for an all-zero series without a total: it still gets an axis)."""
    top = max([*values, total or 0.0])
    return top if top > 0 else 1.0


def bucket_means(times: Sequence[float], values: Sequence[float], width: int
                 ) -> list[float | None]:
    """Means of ``values`` in ``width`` equal time slices from first to last time."""
    if not times:
        return []
    start, end = times[0], times[-1]
    span = end - start
    sums = [0.0] * width
    counts = [0] * width
    for moment, value in zip(times, values, strict=True):
        index = 0 if span <= 0 else min(width - 1, int((moment - start) / span * width))
        sums[index] += value
        counts[index] += 1
    if span <= 0:
        return [sums[0] / counts[0]]
    return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def sparkline(values: Sequence[float | None], top: float | None = None) -> str:
    """Unicode blocks for ``values`` scaled 0..``top`` (default: their max); None -> space."""
    present = [v for v in values if v is not None]
    ceiling = top if top is not None else max(present, default=0.0)
    out = []
    for value in values:
        if value is None:
            out.append(" ")
        elif ceiling <= 0:
            out.append(BLOCKS[0])
        else:
            level = round(max(0.0, min(1.0, value / ceiling)) * (len(BLOCKS) - 1))
            out.append(BLOCKS[level])
    return "".join(out)


def render_history(title: str, points: Sequence[HistoryPoint], width: int = 60) -> str:
    """A title line, then one sparkline per series with min, max and last values."""
    if not points:
        return f"{title}: no history yet"
    times = [p.received_at for p in points]
    start, end = time.localtime(times[0]), time.localtime(times[-1])
    fmt = "%Y-%m-%d %H:%M:%S"
    lines = [f"{title}: {len(points)} points, {time.strftime(fmt, start)} -> "
             f"{time.strftime(fmt, end)} ({format_age(times[-1] - times[0])})"]
    label_width = max(len(label) for label, _, _ in SERIES)
    columns = min(width, len(points))  # fewer points than columns: about one per column
    for label, unit, value_of in SERIES:
        values = [value_of(p) for p in points]
        line = sparkline(bucket_means(times, values, columns))
        lines.append(f"{label.ljust(label_width)}  {line}  min {min(values):.2f}{unit}  "
                     f"max {max(values):.2f}{unit}  last {values[-1]:.2f}{unit}")
    return "\n".join(lines)


def save_png(title: str, points: Sequence[HistoryPoint], path: Path, *,
             totals: Sequence[float | None] = (), interval_seconds: float = 30.0) -> None:
    """Plot the series to ``path`` with matplotlib (optional; MissingExtra if absent).

    ``totals``: the machine's total of each series (in ``SERIES`` order; None: unknown);
    ``interval_seconds``: the agent's heartbeat interval (for the offline shading)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise MissingExtra("--png needs matplotlib, in the png extra: pip install "
                           "'chiffon-worker[png]'; without it, omit --png for a terminal "
                           "chart") from None
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")
    figure, axes = pyplot.subplots(len(SERIES), 1, sharex=True, figsize=(10, 8))
    times = [p.received_at for p in points]
    gaps = offline_spans(times, interval_seconds)
    for index, (axis, (label, unit, value_of)) in enumerate(zip(axes, SERIES, strict=True)):
        values = [value_of(p) for p in points]
        xs, ys = broken_at_gaps(times, values, gaps)
        axis.plot([datetime.fromtimestamp(x) for x in xs], ys,
                  marker="." if len(points) < 50 else "")
        for start, end in gaps:
            axis.axvspan(datetime.fromtimestamp(start), datetime.fromtimestamp(end),
                         color="0.85", label="offline")
        total = totals[index] if index < len(totals) else None
        axis.set_ylim(0, y_top(values, total))
        axis.set_ylabel(label + unit)
    axes[-1].set_xlabel("local time (shaded: no heartbeat, the agent was offline)")
    figure.autofmt_xdate()
    figure.suptitle(title)
    try:
        figure.savefig(path)
    except OSError as exc:
        raise ChiffonError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        pyplot.close(figure)
