"""Plot a benchmark result, one figure per op: speed-up vs eager (per mode) and peak extra memory against the
op's size, per provider.

    python benchmarks/plot.py benchmarks/results/<run>.json [-o STEM]

Writes STEM-<op>.png (default STEM: the JSON's path without .json). One row of panels per dtype. Lines: a
size sweep; hollow markers: the real setups.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from bench_report import MODE_WORDS  # noqa: E402


def _ok(row):
    return row.get("error") is None and row.get("median_ms") is not None


def _panels(meta: dict) -> list[tuple[str, str, str]]:
    """(mode, metric, title): speed-up in every mode, the main one first, then the main mode's memory."""
    main = meta["main_mode"]
    modes = [main] + [mode for mode in meta["modes"] if mode != main]
    return ([(mode, "speedup_vs_eager", f"speed-up vs eager, {MODE_WORDS.get(mode, mode)}") for mode in modes]
            + [(main, "peak_extra_bytes", f"peak extra memory (MiB), {MODE_WORDS.get(main, main)}")])


def plot_op(result: dict, op: str, path: str) -> str | None:
    """The figure of one op; None when it has no successful row."""
    meta = result["ops"][op]
    rows = [r for r in result["rows"] if r["op"] == op and _ok(r)]
    if not rows:
        return None
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    panels = _panels(meta)
    fig, axes = plt.subplots(len(dtypes), len(panels), figsize=(6 * len(panels), 4.2 * len(dtypes)), squeeze=False)
    for axes_row, dtype in zip(axes, dtypes):
        for ax, (mode, metric, title) in zip(axes_row, panels):
            for provider in providers:
                if metric == "speedup_vs_eager" and provider == "eager":
                    continue  # 1 by definition
                chosen = [r for r in rows if r["dtype"] == dtype and r["provider"] == provider
                          and r["mode"] == mode and (r.get(metric) or 0) > 0]  # log axes: no zeros
                if not chosen:
                    continue
                scale = 2**20 if metric == "peak_extra_bytes" else 1
                sweep = sorted((r["size"], r[metric] / scale) for r in chosen if r["group"] == "sweep")
                real = [(r["size"], r[metric] / scale) for r in chosen if r["group"] != "sweep"]
                if sweep:
                    ax.plot(*zip(*sweep), marker="o", color=colors[provider], label=provider)
                if real:
                    ax.scatter(*zip(*real), facecolors="none", edgecolors=colors[provider],
                               label=None if sweep else provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=10 if metric == "peak_extra_bytes" else 2)
            if metric == "speedup_vs_eager":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{title} [{dtype}]", fontsize=10)
            ax.set_xlabel(meta["size_label"])
            ax.grid(True, which="major", alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    machine = result["machine"]
    fig.suptitle(f"{meta['title'].replace('`', '')} on {machine['device_name']} ({machine['date'][:10]}; "
                 f"lines: size sweep, circles: real setups)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(result: dict, stem: str) -> dict[str, str]:
    """STEM-<op>.png for every op of the result that has data: {op: path}."""
    images = {}
    for op in result["ops"]:
        path = plot_op(result, op, f"{stem}-{op}.png")
        if path:
            images[op] = path
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a JSON written by benchmarks/run.py")
    parser.add_argument("-o", "--output-stem", help="path prefix of the PNGs (default: the JSON's, without .json)")
    args = parser.parse_args()
    with open(args.result, encoding="utf-8") as handle:
        result = json.load(handle)
    for path in plot_all(result, args.output_stem or os.path.splitext(args.result)[0]).values():
        print(path)


if __name__ == "__main__":
    main()
