"""The plots cai draws: the harmlessness/helpfulness frontier and the PM's calibration curve.

The frontier is the paper's comparison figure: one point per snapshot (helpfulness Elo on x,
harmlessness Elo on y) with its 95% bootstrap intervals as error bars, and one line per run through
its snapshots in training order (initial -> SFT -> PPO iterations). Points shared by several runs
(the initial model, a shared SFT model) are drawn once and every run's line starts from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from cai.metrics import calibration_bins


def plot_frontier(
    snapshots: Sequence[dict], runs: dict[str, list[str]], path: Path, title: str = "harmlessness vs helpfulness", note: str | None = None
) -> None:
    """snapshots: dicts with key, label and {helpful,harmless}_{elo,low,high}; runs: run -> its snapshot keys in order.

    `note` goes in the bottom corner: the judge's measured agreement with humans.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unmeasured = [axis for axis in ("helpful", "harmless") if all(math.isnan(s[f"{axis}_elo"]) for s in snapshots)]
    if unmeasured:  # an axis with no comparisons is drawn at 0, and the axis label says so
        snapshots = [{**s, **{f"{a}_{f}": 0.0 for a in unmeasured for f in ("elo", "low", "high")}} for s in snapshots]
    by_key = {s["key"]: s for s in snapshots}
    fig, ax = plt.subplots(figsize=(6.5, 5.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (run, keys) in enumerate(runs.items()):
        pts = [by_key[k] for k in keys]
        colour = colours[n % len(colours)]
        xs, ys = [p["helpful_elo"] for p in pts], [p["harmless_elo"] for p in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[[x - p["helpful_low"] for x, p in zip(xs, pts)], [p["helpful_high"] - x for x, p in zip(xs, pts)]],
            yerr=[[y - p["harmless_low"] for y, p in zip(ys, pts)], [p["harmless_high"] - y for y, p in zip(ys, pts)]],
            fmt="o-",
            color=colour,
            ecolor=colour,
            alpha=0.85,
            capsize=3,
            label=run,
        )
    for s in snapshots:
        ax.annotate(s["label"], (s["helpful_elo"], s["harmless_elo"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(
        xlabel="helpfulness Elo" + (" (not measured)" if "helpful" in unmeasured else ""),
        ylabel="harmlessness Elo" + (" (not measured)" if "harmless" in unmeasured else ""),
    )
    ax.set_title(title, fontsize=9)
    if note:
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=6.5, va="bottom", ha="left", color="dimgrey")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration_plot(probs: list[float], outcomes: list[float], path: Path) -> None:
    """A reliability diagram: observed frequency against predicted probability, 10 bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in calibration_bins(probs, outcomes) if b[2]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", label="preference model")
    for conf, freq, count in bins:
        ax.annotate(str(count), (conf, freq), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="predicted P(a preferred)", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title="PM calibration (validation)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
