"""QC picture of one tiled slide: thumbnail, tissue outline and the grid of kept patches.

A reviewer checks at a glance that the tissue was found, that glass and (with pen removal) ink
were left out, and that the patch grid covers the tissue; folds are not detected, so they show
here under the grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from simclr_path.figures import OKABE_ITO, new_figure, plain_text, save_figure


@plain_text
def plot_qc(thumb: np.ndarray, thumb_mpp: float, mask: np.ndarray, mask_mpp: float,
            coords: np.ndarray, size0: float, level0_mpp: float, out: str | os.PathLike,
            title: str, force: bool = False, ink: np.ndarray | None = None,
            dropped: dict[str, np.ndarray] | None = None) -> Path:
    """Write the QC PNG atomically (the picture of :func:`qc_figure`)."""
    fig = qc_figure(thumb, thumb_mpp, mask, mask_mpp, coords, size0, level0_mpp, title, ink=ink,
                    dropped=dropped)
    return save_figure(fig, out, force=force)


def qc_figure(thumb: np.ndarray, thumb_mpp: float, mask: np.ndarray, mask_mpp: float,
              coords: np.ndarray, size0: float, level0_mpp: float, title: str,
              ink: np.ndarray | None = None, dropped: dict[str, np.ndarray] | None = None
              ) -> Figure:
    """The QC picture.

    Args:
        thumb: RGB uint8 (h, w, 3) slide thumbnail at ``thumb_mpp`` um/px.
        mask: bool (hm, wm) tissue mask at ``mask_mpp`` um/px.
        coords: (N, 2) level-0 top-left (x, y) of the kept patches.
        size0: patch side in level-0 pixels.
        level0_mpp: level-0 um/px (axes are in millimetres on the slide).
        title: figure title (slide id, mpp, patch count).
        ink: optional bool (hm, wm) pen ink removed (with its margin), at ``mask_mpp``.
        dropped: optional {reason: (M, 2) level-0 top-left} of tissue cells left out (by the
            white/black/blur filters, for pen ink), each drawn in its own colour and dash, so
            that they do not read as glass.
    """
    h0_um, w0_um = thumb.shape[0] * thumb_mpp, thumb.shape[1] * thumb_mpp
    aspect = thumb.shape[1] / max(thumb.shape[0], 1)
    fig_w = 9.0
    # constrained layout makes room for the legend below the axis labels, whatever the shape:
    # an offset in axes fractions put it on the x label of a wide (short) slide
    fig, ax = new_figure(figsize=(fig_w, max(3.0, min(14.0, fig_w / aspect + 0.8))),
                           layout="constrained")
    to_mm = 1e-3
    # antialiased (a smoothing filter when shrinking): as sharp at this size, half the time
    # of lanczos (0.4 s against 0.8 s a slide)
    ax.imshow(thumb, extent=(0, w0_um * to_mm, h0_um * to_mm, 0), interpolation="antialiased")
    handles = []
    ys = (np.arange(mask.shape[0]) + 0.5) * mask_mpp * to_mm
    xs = (np.arange(mask.shape[1]) + 0.5) * mask_mpp * to_mm
    if mask.any():
        ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[OKABE_ITO[2]],
                   linewidths=1.5)
        handles.append(Line2D([], [], color=OKABE_ITO[2], lw=1.5, label="tissue outline"))
    if ink is not None and ink.any():
        ax.contour(xs, ys, ink.astype(np.float32), levels=[0.5], colors=[OKABE_ITO[3]],
                   linewidths=1.2, linestyles="dashed")
        handles.append(Line2D([], [], color=OKABE_ITO[3], lw=1.2, ls="--",
                              label="pen ink left out"))
    def squares(c: np.ndarray) -> np.ndarray:  # (N, 2) level-0 top-left -> (N, 4, 2) mm
        s = size0 * level0_mpp * to_mm
        x, y = c[:, 0] * level0_mpp * to_mm, c[:, 1] * level0_mpp * to_mm
        return np.stack([np.stack([x, y], 1), np.stack([x + s, y], 1),
                         np.stack([x + s, y + s], 1), np.stack([x, y + s], 1)], axis=1)

    lw = 0.6 if len(coords) < 2000 else 0.3
    if len(coords):
        # a thin white halo under the blue grid: bare, it vanished over dense hematoxylin
        grid = PolyCollection(squares(coords), facecolors="none", edgecolors=OKABE_ITO[0],
                              linewidths=lw)
        grid.set_path_effects([patheffects.withStroke(linewidth=lw + 1.0, foreground="white",
                                                      alpha=0.7)])
        ax.add_collection(grid)
        handles.append(Patch(facecolor="none", edgecolor=OKABE_ITO[0],
                             label=f"kept patches ({len(coords)})"))
    # reddish purple, then orange: apart from the kept blue, the tissue green and the ink's own
    # vermillion outline for colour-blind readers too, and dashed unlike the kept grid
    styles = [(OKABE_ITO[4], (0, (2, 1))), (OKABE_ITO[1], (0, (1, 1)))]
    for (reason, c), (colour, dash) in zip((dropped or {}).items(), styles):
        if len(c):
            ax.add_collection(PolyCollection(squares(np.asarray(c)), facecolors="none",
                                             edgecolors=colour, linewidths=lw * 1.5,
                                             linestyles=[dash]))
            handles.append(Patch(facecolor="none", edgecolor=colour, linestyle=dash,
                                 label=f"{reason} ({len(c)})"))
    ax.set_xlim(0, w0_um * to_mm)
    ax.set_ylim(h0_um * to_mm, 0)
    ax.set_xlabel("x on slide (mm)")
    ax.set_ylabel("y on slide (mm)")
    ax.set_title(title, fontsize=10)
    if handles:
        # two columns at most: four entries in a row ran past a 9 in figure
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2),
                   frameon=False, fontsize=9)
    return fig
