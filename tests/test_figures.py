from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from simclr_path.cli import main


def _assert_png_not_blank(path, min_size=(300, 200)):
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1]
    assert img.std() > 5  # something is drawn


def test_plot_loss_cli(tmp_path, capsys):
    df = pd.DataFrame({"step": np.arange(50), "loss": np.linspace(5, 2, 50), "lr": np.linspace(0, 1e-3, 50)})
    df.to_csv(tmp_path / "metrics.csv", index=False)
    assert main(["plot-loss", str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0
    _assert_png_not_blank(tmp_path / "loss.png")
    assert main(["plot-loss", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics file not found" in err[0]
    assert not (tmp_path / "x.png").exists()
