"""Plot a benchmark result: speed-up vs eager and peak extra memory against feature-map size, per provider.

    python benchmarks/plot.py benchmarks/results/<run>.json [-o out.png]

One row of panels per dtype. Lines: the size sweep; hollow markers: the CIFAR / ImageNet shapes.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

PANELS = (("fwd+bwd", "speedup_vs_eager", "speed-up vs eager, forward + backward"),
          ("fwd", "speedup_vs_eager", "speed-up vs eager, forward only"),
          ("fwd+bwd", "peak_extra_bytes", "peak extra memory (MiB), forward + backward"))


def _ok(row):
    return row.get("error") is None and row.get("median_ms") is not None


def plot(result: dict, path: str) -> str:
    rows = [r for r in result["rows"] if _ok(r)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(dtypes), len(PANELS), figsize=(6 * len(PANELS), 4.2 * len(dtypes)),
                             squeeze=False)
    for axes_row, dtype in zip(axes, dtypes):
        for ax, (mode, metric, title) in zip(axes_row, PANELS):
            for provider in providers:
                # Speed-up of eager is 1 by definition; the preallocated roofline needs no extra memory.
                if (metric, provider) in (("speedup_vs_eager", "eager"), ("peak_extra_bytes", "copy-roofline-out")):
                    continue
                chosen = [r for r in rows if r["dtype"] == dtype and r["provider"] == provider
                          and r["mode"] == mode and (r.get(metric) or 0) > 0]  # log axes: no zeros
                if not chosen:
                    continue
                scale = 2**20 if metric == "peak_extra_bytes" else 1
                sweep = sorted((r["numel"], r[metric] / scale) for r in chosen if r["group"] == "sweep")
                real = [(r["numel"], r[metric] / scale) for r in chosen if r["group"] != "sweep"]
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
            ax.set_xlabel("elements per feature map")
            ax.grid(True, which="major", alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    machine = result["machine"]
    fig.suptitle(f"ofdkern OFD loss on {machine['device_name']} ({machine['date'][:10]}; "
                 f"lines: size sweep, circles: CIFAR/ImageNet shapes)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a JSON written by benchmarks/run.py")
    parser.add_argument("-o", "--output", help="PNG path (default: beside the JSON)")
    args = parser.parse_args()
    with open(args.result, encoding="utf-8") as handle:
        result = json.load(handle)
    print(plot(result, args.output or os.path.splitext(args.result)[0] + ".png"))


if __name__ == "__main__":
    main()
