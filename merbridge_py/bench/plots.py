"""PNG plots of a results.json: latency percentiles and requests/s per mode and
connection count, with interquartile bars computed from the raw rounds.

matplotlib is imported here only (with the Agg backend, no display needed), so
the rest of the benchmark works where it is not installed.
"""

from __future__ import annotations

from pathlib import Path

from . import loads, stats
from .bed import MODES, PATHS

MODE_COLOURS = {"nomesh": "#7f7f7f", "iptables": "#d62728", "ebpf": "#1f77b4"}


def _cases(rows: list[dict], with_latency: bool) -> list[tuple[str, int]]:
    keep = [(r["load"], r["connections"]) for r in rows
            if r["load"] != loads.BULK or not with_latency]
    return sorted(set(keep), key=lambda lc: (loads.LOADS.index(lc[0]), lc[1]))


def _spread(rows: list[dict], path: str, load: str, conns: int, mode: str, field: str):
    """(median, lower error, upper error) from the rounds, or None."""
    values = [r[field] for r in rows if r["ok"] and r[field] is not None and r["mode"] == mode
              and (r["path"], r["load"], r["connections"]) == (path, load, conns)]
    if not values:
        return None
    med = stats.median(values)
    return med, med - stats.quantile(values, 0.25), stats.quantile(values, 0.75) - med


def _label(load: str, conns: int) -> str:
    return f"{load}\nc={conns}"


def _grouped(ax, rows, path, cases, field, modes, scale=1.0):
    """Per case, one point per mode side by side with its IQR as whiskers.
    Points, not bars: on the log scale that very different loads need, a
    bar's height says nothing, a point's position does."""
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for j, (load, conns) in enumerate(cases):
            s = _spread(rows, path, load, conns, mode, field)
            if s:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(s[0] * scale)
                lo.append(s[1] * scale)
                hi.append(s[2] * scale)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", markersize=5, capsize=3, elinewidth=1,
                        color=MODE_COLOURS.get(mode), label=mode)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([_label(*c) for c in cases], fontsize=8)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    for boundary in range(1, len(cases)):
        ax.axvline(boundary - 0.5, color="#dddddd", linewidth=0.8)
    ax.grid(axis="y", which="both", alpha=0.3)


def _log_y(ax, label: str) -> None:
    """Log scale with plain numbers (250, not 2.5x10^2). Minor ticks get labels
    where the axis spans under two decades (a few of them) or under half a
    decade (all), so every panel shows at least two numbers."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    def plain(v: float) -> str:
        return f"{v:,.0f}" if v >= 1 else f"{v:g}"

    class PlainLogFormatter(LogFormatter):
        # LogFormatter picks which minor ticks to label; this only changes how
        # a label reads (6,000 instead of 6e+03)
        def _num_to_string(self, x, vmin, vmax):
            return plain(x)

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: plain(v)))
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel(label)


def plot(results: dict, out_dir: Path) -> list[str]:
    """Write the PNGs into out_dir and return their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rounds"] if r["ok"]]
    # one busy level per plot: the quiet node's when it ran (--busy), else the first level run
    levels = list(dict.fromkeys(r.get("busy", "none") for r in rows))
    shown = "none" if "none" in levels else (levels[0] if levels else "none")
    rows = [r for r in rows if r.get("busy", "none") == shown]
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    written: list[str] = []
    if not rows:
        return written

    # each path plots only the cases it ran
    cases = {p: _cases([r for r in rows if r["path"] == p], with_latency=True) for p in paths}
    widest = max(len(c) for c in cases.values())
    if widest:
        # one column per path, one row per percentile
        fig, axes = plt.subplots(3, len(paths), figsize=((1.5 + 0.9 * widest) * len(paths), 9.6), squeeze=False)
        for i, path in enumerate(paths):
            for j, pct in enumerate(("p50_us", "p90_us", "p99_us")):
                ax = axes[j][i]
                _grouped(ax, rows, path, cases[path], pct, modes)
                _log_y(ax, "µs (log scale)")
                ax.set_title(f"{path}: {pct.removesuffix('_us')} latency", fontsize=10)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Latency per mode and load: median of rounds, whiskers = interquartile range", fontsize=11)
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=100)
        plt.close(fig)
        written.append("latency.png")

        fig, axes = plt.subplots(1, len(paths), figsize=((1.5 + 0.9 * widest) * len(paths), 4.2), squeeze=False)
        for i, path in enumerate(paths):
            ax = axes[0][i]
            _grouped(ax, rows, path, cases[path], "rps", modes)
            _log_y(ax, "req/s (log scale)")
            ax.set_title(f"{path}: requests/s", fontsize=10)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Requests/s per mode and load: median of rounds, whiskers = interquartile range", fontsize=11)
        fig.tight_layout()
        fig.savefig(out_dir / "rps.png", dpi=100)
        plt.close(fig)
        written.append("rps.png")

    if any(r["load"] == loads.BULK for r in rows):
        fig, ax = plt.subplots(figsize=(2 + 2 * len(paths), 3.6))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            for j, path in enumerate(paths):
                s = _spread(rows, path, loads.BULK, 1, mode, "throughput_bps")
                if s:
                    ax.bar(j - 0.4 + width * (i + 0.5), s[0] / 1e9, width=width, color=MODE_COLOURS.get(mode),
                           yerr=[[s[1] / 1e9], [s[2] / 1e9]], capsize=2, label=mode if j == 0 else None)
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels(paths)
        ax.set_ylabel("Gbit/s")
        ax.set_title("bulk throughput (iperf3)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=100)
        plt.close(fig)
        written.append("throughput.png")
    return written
