"""QC picture: written atomically, the expected size, not blank, shows the grid."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from simclr_path.qc import plot_qc, qc_figure


def test_qc_picture(tmp_path):
    thumb = np.full((100, 150, 3), 240, np.uint8)
    thumb[20:80, 30:120] = (200, 120, 190)
    mask = np.zeros((25, 38), bool)
    mask[5:20, 8:30] = True
    coords = np.array([[256, 256], [512, 256], [256, 512]])  # level-0 px at 0.5 um/px
    out = plot_qc(thumb, 4.0, mask, 16.0, coords, 256, 0.5, tmp_path / "qc.png", title="S1: 3")
    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # not blank
    # the patch outlines (Okabe-Ito blue #0072B2) are drawn
    blue = (np.abs(img[..., 0] - 0.0) < 0.1) & (np.abs(img[..., 2] - 0.698) < 0.1)
    assert blue.sum() > 50
    assert not list(tmp_path.glob(".*tmp"))


def test_qc_outlines_the_ink_left_out(tmp_path):
    thumb = np.full((100, 150, 3), 240, np.uint8)
    mask = np.zeros((100, 150), bool)
    mask[20:80, 30:120] = True
    ink = np.zeros_like(mask)
    ink[40:50, 10:140] = True
    coords = np.zeros((0, 2), np.int64)

    def vermillion(fig_kw):  # Okabe-Ito #D55E00, the ink outline
        img = mpimg.imread(plot_qc(thumb, 8.0, mask, 8.0, coords, 64, 0.5, tmp_path / "q.png",
                                   title="S1", force=True, **fig_kw))
        return ((np.abs(img[..., 0] - 0.835) < 0.08) & (np.abs(img[..., 1] - 0.369) < 0.08)
                & (img[..., 2] < 0.08)).sum()

    assert vermillion({"ink": ink}) > 200  # the outline and its legend entry
    assert vermillion({}) == 0 and vermillion({"ink": np.zeros_like(mask)}) == 0
    fig = qc_figure(thumb, 8.0, mask, 8.0, coords, 64, 0.5, title="S1", ink=ink)
    assert "pen ink left out" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_qc_without_tissue(tmp_path):
    thumb = np.full((50, 50, 3), 240, np.uint8)
    out = plot_qc(thumb, 8.0, np.zeros((50, 50), bool), 8.0, np.zeros((0, 2)), 128, 0.5,
                  tmp_path / "empty.png", title="blank: 0 patches")
    img = mpimg.imread(out)
    assert img.shape[0] > 200 and img.shape[1] > 300
    # the slide is drawn, and no patch outline (Okabe-Ito blue #0072B2) nor tissue contour
    blue = (np.abs(img[..., 0] - 0.0) < 0.1) & (np.abs(img[..., 2] - 0.698) < 0.1)
    assert blue.sum() == 0
    fig = qc_figure(thumb, 8.0, np.zeros((50, 50), bool), 8.0, np.zeros((0, 2)), 128, 0.5,
                    title="blank: 0 patches")
    assert fig.axes[0].get_title() == "blank: 0 patches"
    assert not fig.axes[0].collections  # no patch squares, no contour


@pytest.mark.parametrize("shape", [(175, 1000), (100, 100), (1000, 175)])  # wide, square, tall
def test_legend_is_below_the_axis_labels_whatever_the_slide_shape(shape):
    import matplotlib.pyplot as plt

    h, w = shape
    thumb = np.full((h, w, 3), 240, np.uint8)
    thumb[h // 4:3 * h // 4, w // 4:3 * w // 4] = (200, 120, 190)
    mask = np.zeros((h, w), bool)
    mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = True
    coords = np.array([[w, h], [w + 64, h]])  # level-0 px at 0.5 um/px (thumbnail: 2 um/px)
    fig = qc_figure(thumb, 2.0, mask, 2.0, coords, 64, 0.5, title="S1: 2 patches")
    try:
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        ax = fig.axes[0]
        legend = (fig.legends or [ax.get_legend()])[0]
        box = legend.get_window_extent(renderer)
        labels = ax.xaxis.get_tightbbox(renderer)  # x tick labels and x label
        assert box.y1 <= labels.y0 + 1  # below them (display y grows upwards), not over them
        assert not box.overlaps(ax.xaxis.label.get_window_extent(renderer))
        assert fig.bbox.y0 <= box.y0  # and inside the figure
    finally:
        plt.close(fig)
