"""Traffic over time as an inline SVG line chart, drawn on the server: the panel loads no
script and no external asset (its Content-Security-Policy forbids both)."""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from veil.manage.users import format_bytes

# Colours that stay apart for the usual kinds of colour blindness (Okabe and Ito).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442",
           "#000000")
WIDTH, HEIGHT = 760, 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 12, 12, 28
Y_TICKS = 4
X_LABELS = 6
# The y axis never spans less than this, so an idle chart has readable labels.
MIN_Y_SPAN = 1000
LEGEND_ROW = 18


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    values: Sequence[int]  # one per bucket, oldest first


def bucketize(points: Iterable[tuple[int, int]], start: int, step: int,
              count: int) -> list[int]:
    """Sum ``(time, value)`` points into ``count`` buckets of ``step`` seconds from ``start``
    (points outside are dropped)."""
    buckets = [0] * count
    for moment, value in points:
        index = (moment - start) // step
        if 0 <= index < count:
            buckets[index] += value
    return buckets


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= value:
            return factor * magnitude
    raise AssertionError("unreachable")


def _time_label(moment: int, step: int) -> str:
    when = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return when.strftime("%m-%d" if step >= 86400 else "%m-%d %H:00")


def line_chart(series: Sequence[Series], *, start: int, step: int, title: str) -> str:
    """An ``<svg>`` element: one line per series, times in UTC, bytes on the y axis."""
    count = max((len(s.values) for s in series), default=0)
    legend_rows = (len(series) + 3) // 4
    height = HEIGHT + legend_rows * LEGEND_ROW
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    top = _nice_ceiling(max(max((max(s.values, default=0) for s in series), default=0),
                            MIN_Y_SPAN))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
             f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}">',
             f"<title>{html.escape(title)}</title>"]

    def x(i: float) -> float:
        return MARGIN_LEFT + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)

    def y(v: float) -> float:
        return MARGIN_TOP + plot_h - plot_h * v / top

    for tick in range(Y_TICKS + 1):
        value = top * tick / Y_TICKS
        parts.append(f'<line x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" '
                     f'y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{MARGIN_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{html.escape(format_bytes(int(value)))}</text>')
    if count:
        for k in range(X_LABELS):
            i = round(k * (count - 1) / max(X_LABELS - 1, 1))
            anchor = "start" if k == 0 else "end" if k == X_LABELS - 1 else "middle"
            parts.append(f'<text x="{x(i):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" '
                         f'font-size="11">{_time_label(start + i * step, step)}</text>')
    for n, s in enumerate(series):
        color = PALETTE[n % len(PALETTE)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{points}"><title>{html.escape(s.label)}</title></polyline>')
        lx = MARGIN_LEFT + (n % 4) * (plot_w // 4)
        ly = HEIGHT + (n // 4) * LEGEND_ROW + 4
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="{ly + 9}" font-size="12">'
                     f"{html.escape(s.label)}</text>")
    if not any(any(s.values) for s in series):
        parts.append(f'<text x="{MARGIN_LEFT + plot_w / 2}" y="{MARGIN_TOP + plot_h / 2}" '
                     f'text-anchor="middle" fill="#888">no traffic in this period</text>')
    parts.append("</svg>")
    return "".join(parts)
