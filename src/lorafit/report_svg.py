"""report.html's loss chart as inline SVG: hover (or tap) a point to read its step, tokens seen and loss.

The tooltips are SVG <title> elements and the highlight is CSS, with no script, so the report stays one
self-contained file that any browser opens offline; loss.png stays in the report as the static copy.
"""

from __future__ import annotations

import html

W, H = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 14, 34
MAX_POINTS = 400  # hover targets per series: a long run's report stays small
COLORS = {"train": "#2b59c3", "validation": "#d9730d"}

CSS = """
svg.loss{width:100%;height:auto;background:#fff;border:1px solid #d9dde3;border-radius:8px;display:block}
svg.loss text{font:11px system-ui,sans-serif;fill:#5b6472}svg.loss .grid{stroke:#eceef2}
svg.loss path{fill:none;stroke-width:1.6}svg.loss circle{stroke:none}
svg.loss .train circle{fill-opacity:0}svg.loss circle:hover{fill-opacity:1;r:6}
details.png summary{color:#5b6472;cursor:pointer;margin:6px 0}
"""


def _thin(rows: list, limit: int) -> list:
    """At most LIMIT rows, evenly spaced, the last one kept (the final loss is the one people look for)."""
    if len(rows) <= limit:
        return rows
    step = len(rows) / limit
    picked = [rows[int(k * step)] for k in range(limit)]
    return picked if picked[-1] is rows[-1] else picked[:-1] + [rows[-1]]


def _ticks(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * k / (n - 1) for k in range(n)]


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _tip(name: str, row: tuple) -> str:
    step, loss, tokens = row
    seen = f" · {tokens:,} tokens" if tokens is not None else ""
    return html.escape(f"{name} loss {loss:.4f} at step {step}{seen}")


def loss_svg(data: dict) -> str:
    """The train and validation loss against optimizer step (`curves()`'s dict); '' when nothing was logged."""
    rows = data["train"] + data["validation"]
    if not rows:
        return ""
    x0, x1 = min(r[0] for r in rows), max(r[0] for r in rows)
    y0, y1 = min(r[1] for r in rows), max(r[1] for r in rows)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x):
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def sy(y):
        return TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM)

    parts = []
    for y in _ticks(y0, y1, 5):
        parts.append(f'<line class=grid x1={LEFT} x2={W - RIGHT} y1="{sy(y):.1f}" y2="{sy(y):.1f}"></line>')
        parts.append(f'<text x={LEFT - 6} y="{sy(y) + 4:.1f}" text-anchor=end>{_label(y)}</text>')
    for x in sorted({round(x) for x in _ticks(x0, x1, 6)}):  # steps are whole numbers
        parts.append(f'<text x="{sx(x):.1f}" y={H - 14} text-anchor=middle>{x:,}</text>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y={H - 2} text-anchor=middle>optimizer step</text>')
    for k, (name, series) in enumerate((("train", data["train"]), ("validation", data["validation"]))):
        if not series:
            continue
        color = COLORS[name]
        line = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v, _ in _thin(series, 4 * MAX_POINTS))
        parts.append(f'<g class={name}><path stroke="{color}" d="M{line.replace(" ", " L")}"></path>')
        parts += [
            f'<circle cx="{sx(r[0]):.1f}" cy="{sy(r[1]):.1f}" r=4 fill="{color}"><title>{_tip(name, r)}</title></circle>'
            for r in _thin(series, MAX_POINTS)
        ]
        parts.append(
            f'<text x={W - RIGHT - 6} y={TOP + 12 + 14 * k} text-anchor=end style="fill:{color}">{name}</text></g>'
        )
    return (
        f'<svg class=loss viewBox="0 0 {W} {H}" role=img aria-label="loss by optimizer step">'
        "<title>loss by optimizer step (hover a point for its numbers)</title>" + "".join(parts) + "</svg>"
    )
