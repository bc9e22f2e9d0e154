"""Chart geometry for server-rendered SVG: bars and heat maps as plain shapes and labels.

The pages' Content-Security-Policy allows no script and no inline style, so charts are drawn
on the server as SVG with presentation attributes (``fill``, ``x``, ``width``...). Each chart
carries a title and a description for screen readers; the page shows the numbers in a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Colours with at least 3:1 contrast against white, told apart by the legend's words too.
PALETTE = ("#0b5c8a", "#b35c00", "#1e6b34", "#6b3fa0", "#8a1c3c", "#4a5460")
HEAT = "#0b5c8a"
INK = "#1b1f24"
GRID = "#b8c0c8"

WIDTH = 720
PLOT_TOP = 16
PLOT_LEFT = 48
PLOT_RIGHT = 12
AXIS_SPACE = 44
BAR_AREA = 220


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str
    opacity: float = 1.0


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"
    fill: str = INK


@dataclass(frozen=True)
class Chart:
    """Everything the SVG template draws: shapes, labels, grid lines and a legend."""

    id: str
    title: str
    desc: str
    width: int
    height: int
    rects: list[Rect] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    values: list[Label] = field(default_factory=list)
    gridlines: list[tuple[float, float, float, float]] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rects


def axis(peak: float, *, integer: bool = True) -> tuple[float, float]:
    """The top and step of a value axis reaching ``peak``: at most five steps of 1, 2 or 5 x
    10^n (whole numbers for counts)."""
    if peak <= 0:
        return 1.0, 1.0
    raw = peak / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    return round(math.ceil(peak / step - 1e-9) * step, 9), float(step)


def wrap_label(text: str, width: float, lines: int = 2) -> list[str]:
    """``text`` in at most ``lines`` lines that fit ``width`` pixels at the labels' 11 px size
    (about 6.5 px a character), the last cut short with an ellipsis if need be: a team's name
    under its bar, not its id."""
    room = max(4, int(width / 6.5))
    if len(text) <= room or " " not in text:
        return [text]  # short labels (days, weeks) as they are
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and len(line) + 1 + len(words[0]) <= room:
            line += " " + words.pop(0)
        out.append(line)
    if words or (out and len(out[-1]) > room):
        last = " ".join([out[-1], *words]) if out else text
        out[-1] = last[: room - 1].rstrip() + "…"
    return out


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def bar_chart(
    chart_id: str,
    title: str,
    desc: str,
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    stacked: bool = True,
    label_every: int = 1,
    unit: str = "",
    integer: bool = True,
) -> Chart:
    """Vertical bars per category: stacked, or side by side, one colour per series."""
    height = PLOT_TOP + BAR_AREA + AXIS_SPACE
    baseline = PLOT_TOP + BAR_AREA
    plot_width = WIDTH - PLOT_LEFT - PLOT_RIGHT
    slot = plot_width / max(1, len(categories))
    if stacked:
        peak = max((sum(v[i] for _, v in series) for i in range(len(categories))), default=0)
    else:
        peak = max((max(v, default=0) for _, v in series), default=0)
    top, step = axis(peak, integer=integer)
    scale = BAR_AREA / top
    chart = Chart(
        chart_id,
        title,
        desc,
        WIDTH,
        height,
        legend=[(PALETTE[i % len(PALETTE)], name) for i, (name, _) in enumerate(series)],
    )
    for tick in range(round(top / step) + 1):
        value = step * tick
        y = baseline - value * scale
        chart.gridlines.append((PLOT_LEFT, y, WIDTH - PLOT_RIGHT, y))
        chart.labels.append(Label(PLOT_LEFT - 6, y + 4, _number(round(value, 2)), "end"))
    bar_width = slot * 0.7 if stacked else slot * 0.8 / max(1, len(series))
    for index, category in enumerate(categories):
        left = PLOT_LEFT + index * slot + slot * (0.15 if stacked else 0.1)
        stack = 0.0
        for number, (name, values) in enumerate(series):
            value = values[index]
            if value <= 0:
                continue
            x = left if stacked else left + number * bar_width
            bottom = baseline - stack * scale
            bar_height = value * scale
            suffix = f" {unit}" if unit else ""
            chart.rects.append(
                Rect(
                    round(x, 2),
                    round(bottom - bar_height, 2),
                    round(bar_width, 2),
                    round(bar_height, 2),
                    PALETTE[number % len(PALETTE)],
                    f"{category}, {name}: {_number(round(value, 1))}{suffix}",
                )
            )
            if stacked:
                stack += value
        if index % label_every == 0 or index == len(categories) - 1:
            for line, text in enumerate(wrap_label(category, slot)):
                chart.labels.append(
                    Label(PLOT_LEFT + (index + 0.5) * slot, baseline + 16 + 13 * line, text)
                )
    return chart


def heat_map(
    chart_id: str,
    title: str,
    desc: str,
    rows: Sequence[str],
    columns: Sequence[str],
    values: dict[tuple[str, str], int],
    *,
    label_every: int = 1,
) -> Chart:
    """A grid of rows by columns, darker for higher counts, each non-zero cell numbered."""
    left, cell_height = 140, 22
    cell_width = (WIDTH - left - PLOT_RIGHT) / max(1, len(columns))
    height = PLOT_TOP + cell_height * len(rows) + AXIS_SPACE
    peak = max(values.values(), default=0) or 1
    chart = Chart(chart_id, title, desc, WIDTH, height)
    for r, row in enumerate(rows):
        y = PLOT_TOP + r * cell_height
        chart.labels.append(Label(left - 6, y + cell_height / 2 + 4, row, "end"))
        for c, column in enumerate(columns):
            count = values.get((row, column), 0)
            if not count:
                continue
            x = left + c * cell_width
            opacity = round(0.15 + 0.85 * count / peak, 2)
            chart.rects.append(
                Rect(
                    round(x + 1, 2),
                    round(y + 1, 2),
                    round(cell_width - 2, 2),
                    cell_height - 2,
                    HEAT,
                    f"{row}, {column}: {count}",
                    opacity,
                )
            )
            chart.values.append(
                Label(
                    round(x + cell_width / 2, 2),
                    y + cell_height / 2 + 4,
                    str(count),
                    fill="#ffffff" if opacity > 0.55 else INK,
                )
            )
    bottom = PLOT_TOP + cell_height * len(rows)
    chart.gridlines.append((left, bottom, WIDTH - PLOT_RIGHT, bottom))
    for c, column in enumerate(columns):
        if c % label_every == 0 or c == len(columns) - 1:
            chart.labels.append(Label(left + (c + 0.5) * cell_width, bottom + 16, column))
    return chart
