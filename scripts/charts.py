#!/usr/bin/env python3
"""Draws the benchmark curves of docs/benchmarks.md as small SVG line charts.

Reads the `--json` outputs of `switchboard-bench` (as `scripts/curves.sh`
lays them out) and writes, standard library only:

* memory.svg      gateway RSS per idle connection against connections
                  (`idle --connections N`: `rss_per_connection`);
* fanout.svg      one message to every subscriber, p99 delivery latency
                  against subscribers, Switchboard beside the floor server
                  (`fanout --floor --single-only --subscribers N`:
                  `single.delivery_latency_ms.p99`, `floor.single...`);
* handshakes.svg  WebSocket handshakes per second against handshakes in
                  flight, beside the raw TCP accept rate of the same clients
                  (`idle --concurrency C`: `handshakes.rate`,
                  `tcp_baseline.rate`).

    scripts/charts.py [--in DIR] [--out docs/charts]

DIR holds memory/*.json, fanout/*.json and handshakes/*.json. Several runs
at one x are drawn as their median (and a faint dot each). Runs whose
`problems` list is not empty are left out, with a warning.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from xml.sax.saxutils import escape

W, H = 480, 300
LEFT, RIGHT, TOP, BOTTOM = 62, 16, 46, 42
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
# (colour, dash pattern, marker) per series: distinct in grey too.
STYLES = [("#1f5fbf", "", "circle"), ("#d9480f", "5 3", "square")]


def load(folder: Path, scenario: str) -> list[dict]:
    """The valid results of `scenario` in `folder` (with `_file` and `_date`)."""
    runs = []
    for f in sorted(folder.glob("*.json")):
        try:
            j = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"charts.py: skipping {f}: {e}", file=sys.stderr)
            continue
        if j.get("scenario") != scenario:
            continue
        if j.get("problems"):
            print(f"charts.py: skipping {f}: {j['problems']}", file=sys.stderr)
            continue
        j["_file"] = f
        j["_date"] = datetime.date.fromtimestamp(f.stat().st_mtime)
        runs.append(j)
    return runs


def dig(j: dict, *path):
    """j[path[0]][path[1]]..., or None."""
    for p in path:
        if not isinstance(j, dict) or p not in j or j[p] is None:
            return None
        j = j[p]
    return j


def points(runs: list[dict], x_of, y_of) -> list[tuple[float, float, list[float]]]:
    """(x, median y, every y) per distinct x, in order."""
    by_x: dict[float, list[float]] = {}
    for r in runs:
        x, y = x_of(r), y_of(r)
        if x is not None and y is not None:
            by_x.setdefault(float(x), []).append(float(y))
    return [(x, statistics.median(ys), ys) for x, ys in sorted(by_x.items())]


def nice_step(span: float, ticks: int = 5) -> float:
    """A round step (1, 2, 2.5 or 5 × 10^k) giving about `ticks` intervals."""
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def fmt(v: float) -> str:
    """A tick label: thousands separated, no needless decimals."""
    if abs(v) >= 1000 or v == int(v):
        return f"{v:,.0f}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2g}"


class Axis:
    """A linear axis from 0 (or a log one, whole decades) mapped onto
    pixels [p0, p1]; `headroom` above the largest value (linear)."""

    def __init__(self, values: list[float], p0: float, p1: float, log=False, headroom=1.0):
        self.log, self.p0, self.p1 = log, p0, p1
        lo, hi = min(values), max(values)
        if log:
            self.lo = 10 ** math.floor(math.log10(lo))
            self.hi = 10 ** math.ceil(math.log10(hi))
            k = round(math.log10(self.lo))
            self.ticks = [10.0**e for e in range(k, round(math.log10(self.hi)) + 1)]
        else:
            step = nice_step(hi or 1.0)
            self.lo = 0.0
            self.hi = math.ceil(hi * headroom / step) * step
            n = round((self.hi - self.lo) / step)
            self.ticks = [self.lo + i * step for i in range(n + 1)]

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.p0 + f * (self.p1 - self.p0)


def text(x, y, s, size=10, anchor="start", fill="#333", weight="normal", extra=""):
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'fill="{fill}" font-weight="{weight}"{extra}>{escape(s)}</text>'
    )


def marker(kind: str, x: float, y: float, colour: str, r=3.2, opacity=1.0) -> str:
    o = f' fill-opacity="{opacity}"' if opacity < 1 else ""
    if kind == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" fill="{colour}"{o}/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{colour}"{o}/>'


def chart(
    path: Path,
    title: str,
    caption: str,
    xlabel: str,
    ylabel: str,
    series: list[tuple[str, list[tuple[float, float, list[float]]]]],
    xlog=False,
    labels: dict[float, str] | None = None,
) -> None:
    """Writes one line chart: `series` are (name, points) pairs; `labels`
    put a note above the first series' point at an x."""
    series = [(n, p) for n, p in series if p]
    xs = [x for _, p in series for x, _, _ in p]
    ys = [y for _, p in series for _, _, all_y in p for y in all_y]
    x = Axis(xs, LEFT, W - RIGHT, log=xlog)
    y = Axis(ys, H - BOTTOM, TOP, headroom=1.1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="{FONT}">',
        f'<rect width="{W}" height="{H}" fill="#fff"/>',
        text(LEFT - 50, 17, title, size=13, weight="bold", fill="#111"),
        text(LEFT - 50, 32, caption, size=9, fill="#777"),
    ]
    # Grid, ticks and tick labels.
    for t in y.ticks:
        py = y(t)
        out.append(f'<line x1="{LEFT}" y1="{py:.1f}" x2="{W - RIGHT}" y2="{py:.1f}" stroke="#e6e6e6"/>')
        out.append(text(LEFT - 6, py + 3.5, fmt(t), size=9, anchor="end", fill="#555"))
    for t in x.ticks:
        px = x(t)
        out.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{H - BOTTOM}" stroke="#f0f0f0"/>')
        out.append(f'<line x1="{px:.1f}" y1="{H - BOTTOM}" x2="{px:.1f}" y2="{H - BOTTOM + 4}" stroke="#888"/>')
        out.append(text(px, H - BOTTOM + 15, fmt(t), size=9, anchor="middle", fill="#555"))
    out.append(
        f'<path d="M{LEFT},{TOP} V{H - BOTTOM} H{W - RIGHT}" fill="none" stroke="#888"/>'
    )
    out.append(text((LEFT + W - RIGHT) / 2, H - 8, xlabel, size=10, anchor="middle"))
    cy = (TOP + H - BOTTOM) / 2
    out.append(text(14, cy, ylabel, size=10, anchor="middle", extra=f' transform="rotate(-90 14 {cy:.1f})"'))
    # Lines, markers, each run's dot when there are several.
    for k, (name, pts) in enumerate(series):
        colour, dash, kind = STYLES[k % len(STYLES)]
        d = " ".join(f"{'M' if i == 0 else 'L'}{x(px):.1f},{y(py):.1f}" for i, (px, py, _) in enumerate(pts))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        for px, py, all_y in pts:
            if len(all_y) > 1:
                out.extend(marker(kind, x(px), y(v), colour, r=2, opacity=0.3) for v in all_y)
            out.append(marker(kind, x(px), y(py), colour))
            if k == 0 and labels and px in labels:
                halo = ' stroke="#fff" stroke-width="3" paint-order="stroke"'
                # Kept inside the chart at its right edge.
                edge = x(px) > W - RIGHT - 24
                tx = x(px) + (4 if edge else 0)
                anchor = "end" if edge else "middle"
                out.append(text(tx, y(py) - 8, labels[px], size=9, anchor=anchor, fill=colour, extra=halo))
    # Legend in the corner of the plot with the fewest data points under it.
    lw = 12 + max(len(n) for n, _ in series) * 5.6 + 30
    lh = 8 + 15 * len(series)
    samples = []
    for _, pts in series:
        for (ax, ay, _), (bx, by, _) in zip(pts, pts[1:]):
            for i in range(11):
                f = i / 10
                samples.append((x(ax) + f * (x(bx) - x(ax)), y(ay) + f * (y(by) - y(ay))))
        samples.extend((x(px), y(py)) for px, py, _ in pts)
    corners = [
        (LEFT + 8, TOP + 4),
        (W - RIGHT - 8 - lw, TOP + 4),
        (W - RIGHT - 8 - lw, H - BOTTOM - 8 - lh),
        (LEFT + 8, H - BOTTOM - 8 - lh),
    ]
    lx, ly = min(
        corners,
        key=lambda c: sum(c[0] - 6 <= sx <= c[0] + lw + 6 and c[1] - 12 <= sy <= c[1] + lh + 6 for sx, sy in samples),
    )
    out.append(
        f'<rect x="{lx:.1f}" y="{ly:.1f}" width="{lw:.1f}" height="{lh}" fill="#fff" '
        f'fill-opacity="0.9" stroke="#ddd"/>'
    )
    for k, (name, _) in enumerate(series):
        colour, dash, kind = STYLES[k % len(STYLES)]
        yy = ly + 12 + 15 * k
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{lx + 8:.1f}" y1="{yy:.1f}" x2="{lx + 30:.1f}" y2="{yy:.1f}" '
            f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
        )
        out.append(marker(kind, lx + 19, yy, colour))
        out.append(text(lx + 36, yy + 3.5, name, size=9.5))
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
    print(f"charts.py: wrote {path}", file=sys.stderr)


def caption(runs: list[dict], what: str) -> str:
    """Machine and date of the runs, and what was run."""
    m = runs[0].get("machine", {})
    cpu = (m.get("cpu") or "?").split(" with ")[0][:32]
    dates = sorted({r["_date"] for r in runs})
    when = str(dates[0]) if len(dates) == 1 else f"{dates[0]} – {dates[-1]}"
    return f"{cpu}, {m.get('cpus', '?')} vCPUs shared with the clients, loopback · {when} · {what}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="src", type=Path, default=Path("target/bench/curves"))
    ap.add_argument("--out", type=Path, default=Path("docs/charts"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    drawn = 0

    runs = load(a.src / "memory", "idle")
    if runs:
        pts = points(runs, lambda r: r.get("connections"), lambda r: r.get("rss_per_connection"))
        chart(
            a.out / "memory.svg",
            "Gateway memory per idle connection",
            caption(runs, f"hold {runs[0].get('hold_seconds', 15):.0f} s"),
            "idle WebSocket connections (one gateway)",
            "RSS per connection (bytes)",
            [("Switchboard", pts)],
            labels={x: f"{yv:,.0f} B" for x, yv, _ in pts},
        )
        drawn += 1

    runs = load(a.src / "fanout", "fanout")
    if runs:
        n = lambda r: r.get("subscribers")  # noqa: E731
        gw = points(runs, n, lambda r: dig(r, "single", "delivery_latency_ms", "p99"))
        fl = points(runs, n, lambda r: dig(r, "floor", "single", "delivery_latency_ms", "p99"))
        floor_at = {x: yv for x, yv, _ in fl}
        chart(
            a.out / "fanout.svg",
            "One message to every subscriber: p99 latency",
            caption(runs, f"{dig(runs[0], 'single', 'messages') or '?'} messages per size"),
            "subscribers (one channel, one gateway)",
            "p99 delivery latency (ms)",
            [("Switchboard (n.n× the floor's p99)", gw), ("floor: one write per socket, 2 threads", fl)],
            labels={x: f"{yv / floor_at[x]:.1f}×" for x, yv, _ in gw if floor_at.get(x)},
        )
        drawn += 1

    runs = load(a.src / "handshakes", "idle")
    if runs:
        c = lambda r: r.get("concurrency")  # noqa: E731
        hs = points(runs, c, lambda r: dig(r, "handshakes", "rate"))
        tcp = points(runs, c, lambda r: dig(r, "tcp_baseline", "rate"))
        chart(
            a.out / "handshakes.svg",
            "Handshakes per second against concurrency",
            caption(runs, f"{runs[0].get('connections', 0):,} connections per run"),
            "handshakes in flight (log scale)",
            "connections per second",
            [("WebSocket handshakes (Switchboard)", hs), ("raw TCP accepts (tokio accept loop)", tcp)],
            xlog=True,
        )
        drawn += 1

    if not drawn:
        print(f"charts.py: no results under {a.src}/{{memory,fanout,handshakes}}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
