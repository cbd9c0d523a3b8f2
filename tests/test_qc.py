"""QC picture: written atomically, the expected size, not blank, shows the grid."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from simclr_path.qc import plot_qc


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


def test_qc_without_tissue(tmp_path):
    thumb = np.full((50, 50, 3), 240, np.uint8)
    out = plot_qc(thumb, 8.0, np.zeros((50, 50), bool), 8.0, np.zeros((0, 2)), 128, 0.5,
                  tmp_path / "empty.png", title="blank: 0 patches")
    assert out.is_file() and out.stat().st_size > 1000
