"""Render a dashboard's panels from a live Prometheus into one PNG: what Grafana would show,
drawn with matplotlib (no Grafana needed).

    python grafana/preview/render.py --prometheus http://127.0.0.1:9090 \\
        --dashboard grafana/dashboards/netstat-overview.json --out grafana/preview \\
        --var job=netstat --var instance=127.0.0.1:10101 --var state=SYN_RECV

The test suite runs it against the Prometheus it starts; the committed PNGs came from that
run (see tests/test_live_prometheus.py).
"""
from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def substitute(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    expr = expr.replace("$__rate_interval", rate_interval)
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${name}", value)
    return expr


def query(base: str, expr: str, start: float | None = None, end: float | None = None, step: float = 2):
    if start is None:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    else:
        url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def fmt(value: float, unit: str) -> str:
    return f"{value:.2%}" if unit == "percentunit" else f"{value:.4g}"


def legend(fmt: str, labels: dict) -> str:
    text = fmt
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


def render(base: str, dashboard_path: Path, out: Path, variables: dict[str, str],
           rate_interval: str = "15s", window: float = 120) -> Path:
    dashboard = json.loads(dashboard_path.read_text())
    shown = [p for p in dashboard["panels"] if p["type"] != "row"]
    cols = 3
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 6, rows * 3.2))
    end = time.time()
    for ax, panel in zip(axes.flat, shown):
        ax.set_title(substitute(panel["title"], variables, rate_interval), fontsize=10, loc="left")
        unit = panel["fieldConfig"]["defaults"]["unit"]
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables, rate_interval)
            if target.get("instant"):
                data = query(base, expr)["data"]["result"]
                names = [legend(target["legendFormat"], r["metric"]) for r in data][:12]
                values = [float(r["value"][1]) for r in data][:12]
                if panel["type"] == "stat":
                    ax.text(0.5, 0.5, fmt(values[0], unit) if values else "-", ha="center",
                            va="center", fontsize=26, transform=ax.transAxes)
                    ax.axis("off")
                else:
                    ax.barh(names[::-1], values[::-1], color="#5794f2")
                    ax.tick_params(labelsize=7)
                continue
            data = query(base, expr, end - window, end)["data"]["result"]
            if panel["type"] == "stat":
                value = float(data[0]["values"][-1][1]) if data else float("nan")
                ax.text(0.5, 0.5, fmt(value, unit), ha="center", va="center", fontsize=26,
                        transform=ax.transAxes)
                ax.axis("off")
                continue
            for series in data[:12]:
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]), linewidth=1.2)
        if panel["type"] == "timeseries":
            ax.set_xlabel(f"seconds (unit: {unit})", fontsize=7)
            ax.tick_params(labelsize=7)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(dashboard["title"], fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.mkdir(parents=True, exist_ok=True)
    path = out / (dashboard_path.stem + ".png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--dashboard", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--var", action="append", default=[], help="name=value")
    args = parser.parse_args()
    variables = dict(v.split("=", 1) for v in args.var)
    print(render(args.prometheus, args.dashboard, args.out, variables))


if __name__ == "__main__":
    main()
