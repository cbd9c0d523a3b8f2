"""Figures for the report: loss curves, t-SNE maps, ROC/PR curves, confusion matrices, heatmaps.

Every figure has a title and axis labels and uses colour-blind-safe colours (Okabe-Ito for
categories, viridis/cividis for continuous values). Each public ``plot_*`` function writes one PNG
atomically and returns its path; each is also a ``simclr-path plot-*`` subcommand.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from simclr_path.errors import SimclrPathError  # noqa: E402
from simclr_path.outputs import atomic_output  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design": distinguishable under common colour-vision deficiencies.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
DPI = 120


def category_colors(n: int) -> list[str]:
    """``n`` colour-blind-safe category colours (Okabe-Ito, then viridis samples beyond 8)."""
    if n <= len(OKABE_ITO):
        return OKABE_ITO[:n]
    return [matplotlib.colors.to_hex(c) for c in plt.cm.viridis(np.linspace(0, 1, n))]


def save_figure(fig: plt.Figure, out: str | os.PathLike, force: bool = True) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    with atomic_output(out, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


def plot_loss_curve(metrics_csv: str | os.PathLike, out: str | os.PathLike, title: str | None = None,
                    force: bool = True) -> Path:
    """Training loss (raw and smoothed) and learning rate against optimiser step.

    ``metrics_csv`` is the ``metrics.csv`` of a pretraining run (columns ``step``, ``loss``, ``lr``).
    """
    p = Path(metrics_csv)
    if not p.is_file():
        raise SimclrPathError(f"{p}: metrics file not found; it is written by 'simclr-path pretrain'")
    df = pd.read_csv(p)
    if not {"step", "loss"} <= set(df.columns) or df.empty:
        raise SimclrPathError(f"{p}: expected columns 'step' and 'loss' with at least one row")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(df["step"], df["loss"], color=OKABE_ITO[5], alpha=0.5, lw=1, label="loss")
    window = max(1, len(df) // 20)
    ax.plot(df["step"], df["loss"].rolling(window, min_periods=1).mean(), color=OKABE_ITO[0], lw=2,
            label=f"loss (moving mean of {window})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title(title or "SimCLR pretraining loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "lr" in df.columns:
        ax2 = ax.twinx()
        ax2.plot(df["step"], df["lr"], color=OKABE_ITO[1], lw=1.2, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", frameon=False)
    return save_figure(fig, out, force=force)
