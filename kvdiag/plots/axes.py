"""Axis helpers shared by the figures: log axes labelled at the data's own values without overlapping
labels, budget axes labelled with the budgets as asked, and a small dodge so that methods with the
same value stay visible side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence

MARKERS = "osD^vP*Xhp<>"
MIN_LABEL_GAP = 0.12  # share of the axis width between two labelled ticks


def thin_ticks(positions: Sequence[float], lo: float, hi: float, gap: float = MIN_LABEL_GAP) -> list[float]:
    """Positions (log scale, sorted) at least `gap` of the axis [lo, hi] apart, first one kept."""
    span = math.log(hi) - math.log(lo)
    kept: list[float] = []
    for x in sorted(set(positions)):
        if not kept or (math.log(x) - math.log(kept[-1])) / span >= gap:
            kept.append(x)
    return kept


def log_ticks_at(ax, values: Sequence[float], fmt=None, gap: float = MIN_LABEL_GAP) -> list[float]:
    """A log x axis whose labelled ticks are `values` (positive), thinned so that no two labels are
    closer than `gap` of the axis width; no minor labels. Call it after plotting (it reads the limits).
    fmt: value -> label (default: whole numbers from 100 up, 3 significant digits below)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fmt = fmt or (lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}")
    ax.set_xscale("log")
    values = [float(v) for v in values if v > 0 and math.isfinite(v)]
    lo, hi = ax.get_xlim()
    if values:  # a single value: widen the axis around it so that log scale has room
        lo, hi = min(lo, min(values) / 1.3), max(hi, max(values) * 1.3)
        ax.set_xlim(lo, hi)
    ticks = thin_ticks(values, lo, hi, gap)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([fmt(v) for v in ticks])
    return ticks


def dodge(x, index: int, count: int, step: float = 0.03):
    """Shift log-axis positions by a few percent per series, centred, so equal points do not hide
    each other (index of the series among `count`)."""
    import numpy as np

    return np.asarray(x, dtype=float) * math.exp((index - (count - 1) / 2) * step)
