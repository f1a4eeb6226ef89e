"""Draw the Grafana dashboard's panels from a live Prometheus, without Grafana (docs/img picture).

Each panel of deploy/grafana/dashboards/streamtrainer.json is placed on its grid position and
drawn from its own queries (the template variables set to "All"), so the picture shows what
the dashboard shows; Grafana draws it with its own styling.

    python deploy/grafana/preview.py --prometheus http://127.0.0.1:9090 --minutes 5 \
        --output docs/img/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "streamtrainer.json"
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a"]
UNIT_CELL_IN = 0.34  # one grid row of Grafana (30 px) in inches
SUB = 4


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
            body = json.loads(response.read())
        if body["status"] != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]


def _variables(prometheus: Prometheus, dashboard: dict[str, Any], start: float, end: float) -> dict[str, str]:
    """Every template variable at "All": the alternation of its values, as Grafana writes it."""
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue  # the data source: this draws from the one Prometheus it is given
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        query = _substitute(query, values, "1m")
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        if match is None:
            raise ValueError(f"unsupported variable query {query}")
        found = prometheus.get(
            f"label/{match.group(2)}/values",
            {"match[]": match.group(1), "start": str(start), "end": str(end)},
        )
        escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", v) for v in found]
        values[variable["name"]] = "(" + "|".join(escaped) + ")" if escaped else "^$"
    return values


def _substitute(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    expr = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${name}", variables[name])
    return expr


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or str(labels)


def _format(value: float, unit: str, decimals: int | None) -> str:
    if not math.isfinite(value):
        return "NaN"
    if unit == "s":
        if value >= 3600:
            return f"{value / 3600:.1f} h"
        if value >= 60:
            return f"{value / 60:.1f} min"
        if value >= 1:
            return f"{value:.1f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.1f} ms"
        return f"{value * 1e6:.0f} µs"
    if unit == "short" and abs(value) >= 1000:
        return f"{value / 1000:.{1 if decimals is None else decimals}f}K"
    return f"{value:.{2 if decimals is None else decimals}f}"


def _style(axes: Axes, title: str) -> None:
    axes.set_facecolor(PANEL)
    axes.set_title(title, color=TEXT, fontsize=9, loc="left")
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.tick_params(colors=TEXT, labelsize=7)


def render(
    prometheus: Prometheus, output: Path, minutes: float, step_s: float, end: float | None = None
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    end = time.time() if end is None else end
    start = end - minutes * 60
    variables = _variables(prometheus, dashboard, start, end)
    rate_interval = f"{max(4 * step_s, 20):.0f}s"
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    figure = Figure(figsize=(24 * 0.9, height * UNIT_CELL_IN), dpi=80, facecolor=BACKGROUND)
    # Each Grafana grid cell is SUB x SUB subcells: room for a panel's title above it, its x tick
    # labels below it and its y tick labels on its left, inside the panel's own cells.
    grid = figure.add_gridspec(
        height * SUB, 24 * SUB, left=0.005, right=0.995, top=0.975, bottom=0.005, hspace=0, wspace=0
    )
    figure.suptitle(
        f"{dashboard['title']} — last {minutes:g} minutes (preview drawn from Prometheus, not Grafana)",
        color=TEXT,
        fontsize=12,
        x=0.01,
        y=0.995,
        ha="left",
    )
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        if panel["type"] == "row":
            axes = figure.add_subplot(grid[pos["y"] * SUB : (pos["y"] + 1) * SUB, :])
            axes.axis("off")
            axes.text(
                0, 0.4, panel["title"], color=TEXT, fontsize=11, fontweight="bold", transform=axes.transAxes
            )
            continue
        rows = slice(pos["y"] * SUB + 2, (pos["y"] + pos["h"]) * SUB - 2)
        left = 1 if panel["type"] == "stat" else 3
        columns = slice(pos["x"] * SUB + left, (pos["x"] + pos["w"]) * SUB - 1)
        axes = figure.add_subplot(grid[rows, columns])
        _style(axes, panel["title"])
        defaults = panel["fieldConfig"]["defaults"]
        unit, decimals = defaults.get("unit", "none"), defaults.get("decimals")
        if panel["type"] == "stat":
            _draw_stat(
                prometheus,
                axes,
                panel=panel,
                variables=variables,
                rate_interval=rate_interval,
                unit=unit,
                decimals=decimals,
                at=end,
            )
        else:
            _draw_series(
                prometheus,
                axes,
                panel=panel,
                variables=variables,
                rate_interval=rate_interval,
                window=(start, end, step_s),
                unit=unit,
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", facecolor=BACKGROUND)
    logger.info("wrote %s", output)


def _draw_stat(
    prometheus: Prometheus,
    axes: Axes,
    *,
    panel: dict[str, Any],
    variables: dict[str, str],
    rate_interval: str,
    unit: str,
    decimals: int | None,
    at: float,
) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    values: list[float] = []
    for target in panel["targets"]:
        expr = _substitute(target["expr"], variables, rate_interval)
        result = prometheus.get("query", {"query": expr, "time": str(at)})
        values += [float(series["value"][1]) for series in result["result"]]
    text = "  ".join(_format(v, unit, decimals) for v in values[:2]) if values else "No data"
    axes.text(0.5, 0.4, text, color="#73bf69", fontsize=18, fontweight="bold", ha="center", va="center",
              transform=axes.transAxes)  # fmt: skip


def _draw_series(
    prometheus: Prometheus,
    axes: Axes,
    *,
    panel: dict[str, Any],
    variables: dict[str, str],
    rate_interval: str,
    window: tuple[float, float, float],
    unit: str,
) -> None:
    start, end, step = window
    color = 0
    for target in panel["targets"]:
        result = prometheus.get(
            "query_range",
            {
                "query": _substitute(target["expr"], variables, rate_interval),
                "start": str(start),
                "end": str(end),
                "step": str(step),
            },
        )
        for series in result["result"]:
            times = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            label = _legend(target.get("legendFormat", ""), series["metric"])
            axes.plot(times, values, color=COLORS[color % len(COLORS)], linewidth=1.2, label=label)
            color += 1
    axes.grid(True, color=GRID, linewidth=0.5)
    axes.xaxis.set_major_formatter(_time_formatter())
    if unit == "s":
        axes.yaxis.set_major_formatter(lambda v, _: _format(v, "s", None))
    if color:
        legend = axes.legend(loc="upper left", fontsize=6, frameon=False, ncols=min(color, 3))
        for text in legend.get_texts():
            text.set_color(TEXT)


def _time_formatter() -> Any:
    from matplotlib.dates import DateFormatter

    return DateFormatter("%H:%M")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL.")
    parser.add_argument("--minutes", type=float, default=15.0, help="Time range drawn.")
    parser.add_argument("--step", type=float, default=5.0, help="Seconds between points.")
    parser.add_argument("--end", type=float, default=None, help="End of the range, Unix time (default: now).")
    parser.add_argument("--output", type=Path, default=Path("docs/img/dashboard.png"), help="PNG to write.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    render(Prometheus(args.prometheus), args.output, args.minutes, args.step, args.end)


if __name__ == "__main__":
    main()
