"""Tokens per guild and day as a stacked bar chart, drawn on the server as SVG.

No chart library and no script: the page stays readable without JavaScript and the
chart scales with the viewport (``viewBox``). Every label is escaped here, since the
markup is inserted into the page as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from html import escape

#: Colours of the series, in order (the last one is "other").
PALETTE = ("#3b7dd8", "#e0803a", "#4caf7a", "#b05cc8", "#d8b33b", "#8a8f98")
#: Series drawn one by one; the rest are summed as "other".
MAX_SERIES = len(PALETTE) - 1
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


@dataclass(frozen=True, slots=True)
class Series:
    """One stacked series: a label and a value per day."""

    label: str
    values: dict[date, int]


def nice_ceiling(value: int) -> int:
    """A round axis maximum at or above ``value`` (1, 2, 5 times a power of ten)."""
    if value <= 0:
        return 1
    power = 1
    while power * 10 <= value:
        power *= 10
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power  # pragma: no cover


def short_number(value: int) -> str:
    """12,300 -> 12.3k; 4,500,000 -> 4.5M."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if value >= size:
            text = f"{value / size:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    return str(value)


def group_series(totals: dict[str, dict[date, int]], other_label: str) -> list[Series]:
    """The heaviest :data:`MAX_SERIES` labels, and the others summed as one."""
    ranked = sorted(totals, key=lambda k: (-sum(totals[k].values()), k))
    series = [Series(k, totals[k]) for k in ranked[:MAX_SERIES]]
    rest = ranked[MAX_SERIES:]
    if rest:
        other: dict[date, int] = {}
        for key in rest:
            for day, value in totals[key].items():
                other[day] = other.get(day, 0) + value
        series.append(Series(other_label, other))
    return series


def stacked_bars(series: list[Series], first: date, last: date, *, title: str) -> str:
    """The SVG markup of a stacked daily bar chart from ``first`` to ``last``."""
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    totals = [sum(s.values.get(d, 0) for s in series) for d in days]
    top = nice_ceiling(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    bar = max(slot * 0.7, 1.0)
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):  # grid lines and axis labels
        value = top * i // 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
            f"{escape(short_number(value))}</text>"
        )
    label_every = max(1, len(days) // 8)
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar) / 2
        y = TOP + plot_h
        for colour, s in zip(PALETTE, series, strict=False):
            value = s.values.get(day, 0)
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}"'
                f' fill="{colour}"><title>{escape(s.label)} {day.isoformat()}:'
                f" {value:,}</title></rect>"
            )
        if i % label_every == 0:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{HEIGHT - 8}" class="axis"'
                f' text-anchor="middle">{day.strftime("%m-%d")}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def legend(series: list[Series]) -> list[tuple[str, str]]:
    """(colour, label) per series, for the page's legend."""
    return [(colour, s.label) for colour, s in zip(PALETTE, series, strict=False)]
