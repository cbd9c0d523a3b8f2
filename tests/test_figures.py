from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from PIL import Image

from simclr_path.cli import main


def _assert_png_not_blank(path, min_size=(300, 200)):
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1]
    assert img.std() > 5  # something is drawn


def _with_a_training_slide(cohort, dst):
    """A classify run of the cohort on a samples-sheet split: patients P0 and P1 train, P2 and
    P3 test; the training slides' patch rows have fold -1 and no scores, as classify writes
    them (so slide P0-SCC is drawn without predictions)."""
    from simclr_path.classify import classify
    from simclr_path.config import ClassifyConfig

    sheet = pd.read_csv(cohort["sheet"], sep="\t")
    sheet["split"] = ["train" if p in ("P0", "P1") else "test" for p in sheet["patient_id"]]
    sheet.to_csv(dst.with_suffix(".tsv"), sep="\t", index=False)
    with warnings.catch_warnings():  # one patient per class to train on: C is not tuned
        warnings.simplefilter("ignore")
        classify(cohort["embs"], dst, samples=dst.with_suffix(".tsv"),
                 cfg=ClassifyConfig(bootstrap=0, c_grid=[0.1, 1.0]))
    pp = pd.read_csv(dst / "predictions_patches.csv", dtype={"slide_id": str})
    assert pp.loc[pp["slide_id"] == "P0-SCC", "score"].isna().all()
    return dst


def test_plot_loss_cli(tmp_path, capsys):
    df = pd.DataFrame(
        {"step": np.arange(50), "loss": np.linspace(5, 2, 50), "lr": np.linspace(0, 1e-3, 50)}
    )
    df.to_csv(tmp_path / "metrics.csv", index=False)
    assert main(["plot-loss", str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0
    _assert_png_not_blank(tmp_path / "loss.png")
    assert main(["plot-loss", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics file not found" in err[0]
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# Classifier and embedding figures on a tiny synthetic cohort
# ---------------------------------------------------------------------------------------------
import pytest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 patients x (SCC, normal) slides: patch stores on a 6x6 grid, embeddings, a classify run."""
    from simclr_path.classify import classify
    from simclr_path.config import ClassifyConfig
    from simclr_path.store import PatchStoreWriter, write_embeddings

    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows, embs, stores = [], [], []
    g, size = 6, 16
    for p in range(4):
        for lab, colour in (("SCC", (150, 60, 140)), ("normal", (235, 180, 215))):
            sid = f"P{p}-{lab}"
            coords = np.stack(np.meshgrid(np.arange(g), np.arange(g)), -1).reshape(-1, 2) * size * 2
            patches = np.clip(
                np.array(colour) + rng.normal(0, 25, (g * g, size, size, 3)), 0, 255
            ).astype(np.uint8)
            with PatchStoreWriter(
                root / f"{sid}.store.h5",
                size,
                attrs={"slide_id": sid, "kind": "slide", "mpp": 0.5, "level0_mpp": 0.25},
            ) as w:
                w.append(patches, coords)
            X = rng.normal(size=(g * g, 8)).astype(np.float32)
            X[:, 0] += 1.5 * (lab == "SCC")
            write_embeddings(root / f"{sid}.h5", X, coords, {"slide_id": sid})
            embs.append(root / f"{sid}.h5")
            stores.append(root / f"{sid}.store.h5")
            rows.append({"slide_id": sid, "path": "x.svs", "label": lab, "patient_id": f"P{p}"})
    sheet = root / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    classify(embs, root / "cls", samples=sheet, cfg=ClassifyConfig(bootstrap=50, c_grid=[0.1, 1.0]))
    return {"root": root, "embs": embs, "stores": stores, "sheet": sheet, "cls": root / "cls"}


def test_plot_tsne_cli(cohort, tmp_path, capsys):
    outs = [tmp_path / n for n in ("label.png", "slide.png", "thumbs.png")]
    args = [
        "plot-tsne",
        "--embeddings",
        *map(str, cohort["embs"]),
        "--samples",
        str(cohort["sheet"]),
        "--out-label",
        str(outs[0]),
        "--out-slide",
        str(outs[1]),
        "--stores",
        *map(str, cohort["stores"]),
        "--out-thumbnails",
        str(outs[2]),
        "--max-points",
        "150",
    ]
    assert main(args) == 0
    for o in outs:
        _assert_png_not_blank(o)
    capsys.readouterr()
    assert main(args) != 0  # outputs exist, no --force
    assert "already exists" in capsys.readouterr().err


def test_tsne_sample_is_stratified(cohort):
    from simclr_path.figures import sample_embeddings

    df = sample_embeddings(cohort["embs"], 80, samples=cohort["sheet"])
    assert len(df) == 80
    counts = df["slide_id"].value_counts()
    assert len(counts) == 8 and counts.min() == counts.max() == 10
    assert set(df["label"]) == {"SCC", "normal"}


def test_tsne_sample_gives_small_slides_unused_share_to_big_ones(tmp_path):
    from simclr_path.figures import sample_embeddings
    from simclr_path.store import write_embeddings

    rng = np.random.default_rng(0)
    paths, rows = [], []
    for i, n in enumerate([1000] + [5] * 9):
        sid = f"S{i}"
        coords = np.stack([np.arange(n), np.zeros(n, int)], 1)
        write_embeddings(tmp_path / f"{sid}.h5", rng.normal(size=(n, 4)).astype(np.float32),
                         coords, {"slide_id": sid})
        paths.append(tmp_path / f"{sid}.h5")
        rows.append({"slide_id": sid, "path": "x.svs", "label": "SCC" if i % 2 else "normal",
                     "patient_id": f"P{i}"})
    sheet = tmp_path / "s.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    counts = sample_embeddings(paths, 200, samples=sheet)["slide_id"].value_counts()
    assert counts.sum() == 200 and counts["S0"] == 155 and (counts.drop("S0") == 5).all()


def test_plot_curves_confusion_heatmap_cli(cohort, tmp_path, capsys):
    roc, pr, cm, hm = (tmp_path / n for n in ("roc.png", "pr.png", "cm.png", "hm.png"))
    assert (
        main(
            [
                "plot-curves",
                "--classify",
                str(cohort["cls"]),
                "--out-roc",
                str(roc),
                "--out-pr",
                str(pr),
            ]
        )
        == 0
    )
    assert main(["plot-confusion", "--classify", str(cohort["cls"]), "--out", str(cm)]) == 0
    assert (
        main(
            [
                "plot-heatmap",
                "--classify",
                str(cohort["cls"]),
                "--store",
                str(cohort["stores"][0]),
                "--out",
                str(hm),
            ]
        )
        == 0
    )
    for p in (roc, pr, cm, hm):
        _assert_png_not_blank(p)
    # heatmap from a 'predict' CSV, and a clear error for a slide without predictions
    from simclr_path.classify import predict

    csv = predict(cohort["cls"], cohort["embs"][:1], tmp_path / "pred.csv")
    assert (
        main(
            [
                "plot-heatmap",
                "--classify",
                str(csv),
                "--store",
                str(cohort["stores"][0]),
                "--out",
                str(tmp_path / "hm2.png"),
            ]
        )
        == 0
    )
    _assert_png_not_blank(tmp_path / "hm2.png")
    capsys.readouterr()
    assert (
        main(
            [
                "plot-heatmap",
                "--classify",
                str(csv),
                "--store",
                str(cohort["stores"][1]),
                "--out",
                str(tmp_path / "hm3.png"),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no patch predictions for slide 'P0-normal'" in err[0]
    assert not (tmp_path / "hm3.png").exists()
    assert (
        main(
            [
                "plot-curves",
                "--classify",
                str(tmp_path),
                "--out-roc",
                str(tmp_path / "r.png"),
                "--out-pr",
                str(tmp_path / "p.png"),
            ]
        )
        != 0
    )
    assert "not a 'simclr-path classify' results folder" in capsys.readouterr().err


def test_heatmap_mosaic_matches_coordinates(cohort):
    from simclr_path.figures import slide_thumbnail
    from simclr_path.store import PatchStore

    st = PatchStore(cohort["stores"][0])
    img, extent = slide_thumbnail(st)
    # 6 x 6 patches of 32 level-0 px (16 px at 0.5 um/px over a 0.25 um/px scan)
    assert extent == (0.0, 192.0, 192.0, 0.0)
    assert img.shape[2] == 3 and img.shape[0] == img.shape[1] and (img < 250).mean() > 0.9


def test_umap_optional(cohort, tmp_path, capsys):
    import importlib.util

    args = [
        "plot-tsne",
        "--embeddings",
        *map(str, cohort["embs"]),
        "--out-label",
        str(tmp_path / "l.png"),
        "--out-slide",
        str(tmp_path / "s.png"),
        "--out-umap",
        str(tmp_path / "u.png"),
        "--max-points",
        "100",
    ]
    if importlib.util.find_spec("umap") is None:
        assert main(args) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install umap-learn" in err[0] and "simclr-path[umap]" not in err[0]
        assert not (tmp_path / "l.png").exists()
    else:
        assert main(args) == 0
        _assert_png_not_blank(tmp_path / "u.png")


def test_thumbnail_from_slide_file(tmp_path):
    from conftest import SLIDES

    slide = SLIDES / "cmu-1-small-region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} not available")
    from simclr_path.figures import slide_thumbnail
    from simclr_path.store import PatchStore, PatchStoreWriter

    with PatchStoreWriter(
        tmp_path / "s.h5",
        16,
        attrs={"slide_id": "cmu", "source_path": str(slide), "mpp": 0.5, "level0_mpp": 0.499},
    ) as w:
        w.append(
            np.zeros((4, 16, 16, 3), dtype=np.uint8), np.array([[0, 0], [16, 0], [0, 16], [16, 16]])
        )
    img, extent = slide_thumbnail(PatchStore(tmp_path / "s.h5"), max_side=256)
    assert extent == (0.0, 2220.0, 2967.0, 0.0)  # the whole slide, from OpenSlide
    assert max(img.shape[:2]) == 256 and img.std() > 5


def test_thumbnail_stored_by_tile_needs_no_slide_file(tmp_path):
    import shutil

    from simclr_path.config import TileConfig
    from simclr_path.demo import make_demo_slide
    from simclr_path.figures import slide_thumbnail
    from simclr_path.store import PatchStore
    from simclr_path.tiling import tile_slide

    slide = make_demo_slide(tmp_path / "S1.tiff", kind="scc", seed=1, width=1536, height=1024,
                            mpp=0.5)
    tile_slide(slide, tmp_path / "S1.h5", TileConfig(mpp=1.0, patch_size=64), progress=False)
    shutil.move(slide, tmp_path / "moved.tiff")  # the slide is gone: no OpenSlide, no mosaic
    with PatchStore(tmp_path / "S1.h5") as st:
        img, extent = slide_thumbnail(st, max_side=512)
        assert extent == (0.0, 1536.0, 1024.0, 0.0) and img.shape == (342, 512, 3)
        assert (img < 200).any(axis=2).mean() > 0.2  # the slide's tissue, not a blank canvas


def test_heatmap_refuses_a_slide_id_that_is_not_the_stores(cohort, tmp_path, capsys):
    out = tmp_path / "hm.png"
    argv = ["plot-heatmap", "--classify", str(cohort["cls"]), "--store", str(cohort["stores"][0]),
            "--out", str(out), "--slide-id", "P1-SCC"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds slide 'P0-SCC', not 'P1-SCC'" in err[0]
    assert not out.exists()


def test_a_slide_without_held_out_predictions_gets_its_picture_and_the_reason(cohort, tmp_path,
                                                                            capsys):

    from simclr_path.store import PatchStoreWriter

    # no tissue: tiling wrote an empty store, and classify left the slide out
    with PatchStoreWriter(tmp_path / "blank.h5", 16, attrs={"slide_id": "blank", "kind": "slide",
                                                            "mpp": 0.5, "level0_mpp": 0.25}):
        pass
    out = tmp_path / "blank.png"
    assert main(["plot-heatmap", "--classify", str(cohort["cls"]), "--store",
                 str(tmp_path / "blank.h5"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    # a training slide of a samples-sheet split: rows with fold -1 only
    cls = _with_a_training_slide(cohort, tmp_path / "cls")
    # the held-out figures draw the test slides (the empty scores of training rows stopped them)
    assert main(["plot-curves", "--classify", str(cls), "--out-roc", str(tmp_path / "r.png"),
                 "--out-pr", str(tmp_path / "p.png")]) == 0, capsys.readouterr().err
    assert main(["plot-confusion", "--classify", str(cls), "--out",
                 str(tmp_path / "c.png")]) == 0, capsys.readouterr().err
    out = tmp_path / "train.png"
    assert main(["plot-heatmap", "--classify", str(cls), "--store", str(cohort["stores"][0]),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    _assert_png_not_blank(out)
    # a slide that classify never saw is still an error
    with PatchStoreWriter(tmp_path / "other.h5", 16, attrs={"slide_id": "other", "kind": "slide",
                                                            "mpp": 0.5}) as w:
        w.append(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 2), np.int64))
    assert main(["plot-heatmap", "--classify", str(cohort["cls"]), "--store",
                 str(tmp_path / "other.h5"), "--out", str(tmp_path / "o.png")]) != 0
    assert "no patch predictions for slide 'other'" in capsys.readouterr().err


def _set_first(csv: str, column: str, value: str) -> str:
    """``csv`` with ``column`` of its first data row set to ``value``."""
    lines = csv.splitlines()
    i = lines[0].split(",").index(column)
    cells = lines[1].split(",")
    cells[i] = value
    return "\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n"


def _drop_key(text: str, section: str, key: str) -> str:
    import json

    d = json.loads(text)
    del d[section][key]
    return json.dumps(d)


def test_curves_draw_every_class_of_a_many_class_task(tmp_path, monkeypatch):
    import json

    from simclr_path import figures

    classes = [f"c{i}" for i in range(10)]  # more than the 8 colour-blind-safe colours
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 10, n)
    prob = rng.dirichlet(np.ones(10), n)
    cls = tmp_path / "cls"
    cls.mkdir()
    patches = pd.DataFrame({"slide_id": [f"s{i % 20}" for i in range(n)], "label": [classes[k] for k in y],
                            "fold": 0, **{f"prob_{c}": prob[:, j] for j, c in enumerate(classes)}})
    patches.to_csv(cls / "predictions_patches.csv", index=False)
    slides = patches.groupby("slide_id").agg({"label": "first", **{f"prob_{c}": "mean" for c in classes}})
    slides.reset_index().to_csv(cls / "predictions_slides.csv", index=False)
    cm = np.zeros((10, 10), int).tolist()
    (cls / "metrics.json").write_text(json.dumps({
        "task": {"classes": classes, "positive": None, "evaluation": "grouped_2fold"},
        "patch": {"confusion_matrix": cm},
        "slide": {"confusion_matrix": cm, "auroc": 0.98321, "auroc_ci95": [0.96912, 0.99634]}}))
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_curves(cls, tmp_path / "roc.png", tmp_path / "pr.png")
    roc = drawn[0]
    labels = roc.axes[0].get_legend_handles_labels()[1]
    assert sum(lab.startswith("c") and "vs rest" in lab for lab in labels) == 10, labels
    # the macro AUROC is in no legend: the title gives it with its CI, to the legend's decimals
    assert "macro AUROC 0.983 95% CI 0.969-0.996" in roc.axes[1].get_title()


def test_curves_of_equal_classes_without_a_positive_count_per_class(tmp_path, monkeypatch):
    """One-vs-rest curves of three equal classes all have 10 positives and 20 negatives: the
    title said "10 positive, 20 negative" for a model with no positive class (review)."""
    import json

    from simclr_path import figures

    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    prob = rng.dirichlet(np.ones(3), 30)
    cls = tmp_path / "cls"
    cls.mkdir()
    table = pd.DataFrame({"slide_id": [f"s{i}" for i in range(30)], "label": [classes[k] for k in y],
                          "fold": 0, **{f"prob_{c}": prob[:, j] for j, c in enumerate(classes)}})
    table.to_csv(cls / "predictions_patches.csv", index=False)
    table.drop(columns="fold").to_csv(cls / "predictions_slides.csv", index=False)
    cm = np.zeros((3, 3), int).tolist()
    (cls / "metrics.json").write_text(json.dumps({
        "task": {"classes": classes, "positive": None, "evaluation": "grouped_2fold"},
        "patch": {"confusion_matrix": cm}, "slide": {"confusion_matrix": cm}}))
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_curves(cls, tmp_path / "roc.png", tmp_path / "pr.png")
    titles = [ax.get_title() for fig in drawn for ax in fig.axes[:2]]
    assert all("10 per class" in t and "positive" not in t for t in titles), titles


@pytest.mark.parametrize("damage, match", [
    ({"predictions_slides.csv": ""}, "predictions_slides.csv: not a readable CSV table"),
    ({"predictions_patches.csv": "a,b\n1,2\n"}, "predictions_patches.csv: expected columns"),
    ({"metrics.json": "{broken"}, "metrics.json: not a classify metrics file"),
    ({"metrics.json": "[1, 2]"}, "metrics.json: not a classify metrics file"),
    ({"predictions_patches.csv": lambda t: _set_first(t, "score", "abc")},
     "predictions_patches.csv: column score is not all numbers"),
    ({"metrics.json": lambda t: _drop_key(t, "slide", "confusion_matrix")},
     "metrics.json: no slide-level confusion matrix"),  # was drawn as a matrix of zeros
    # rows without a score were left out of the curves in silence (titles counted them)
    ({"predictions_patches.csv": lambda t: _set_first(t, "score", "nan")},
     "predictions_patches.csv: column score has 1 empty or non-finite value(s) (first on row 2)"),
    ({"predictions_slides.csv": lambda t: _set_first(t, "score", "")},
     "predictions_slides.csv: column score has 1 empty or non-finite value(s)"),
])
def test_damaged_results_folder_gives_one_line(cohort, tmp_path, capsys, damage, match):
    import shutil

    cls = tmp_path / "cls"
    shutil.copytree(cohort["cls"], cls)
    for name, text in damage.items():
        old = (cls / name).read_text()
        (cls / name).write_text(text(old) if callable(text) else text)
    for argv in (["plot-curves", "--classify", str(cls), "--out-roc", str(tmp_path / "r.png"),
                  "--out-pr", str(tmp_path / "p.png")],
                 ["plot-confusion", "--classify", str(cls), "--out", str(tmp_path / "c.png")]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())


@pytest.mark.parametrize("text, match", [
    ("", "not a readable CSV table"),
    ("step,loss\n", "expected columns loss, step with at least one row"),
    ("step,loss\n1,abc\n", "column loss is not all numbers"),
])
def test_plot_loss_damaged_metrics_csv(tmp_path, capsys, text, match):
    (tmp_path / "metrics.csv").write_text(text)
    assert main(["plot-loss", str(tmp_path), "--out", str(tmp_path / "l.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "l.png").exists()


def test_plot_tsne_max_points_is_validated(cohort, tmp_path, capsys):
    argv = ["plot-tsne", "--embeddings", *map(str, cohort["embs"]), "--samples",
            str(cohort["sheet"]), "--out-label", str(tmp_path / "a.png"),
            "--out-slide", str(tmp_path / "b.png")]
    for bad in ("0", "-5", "1000000"):  # a million points would run t-SNE for hours
        assert main([*argv, "--max-points", bad]) != 0
        assert "classify.tsne_max_points must be between 10 and 100000" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_plot_tsne_checks_the_stores_before_writing_anything(cohort, tmp_path, capsys):
    argv = ["plot-tsne", "--embeddings", *map(str, cohort["embs"]), "--samples",
            str(cohort["sheet"]), "--out-label", str(tmp_path / "a.png"),
            "--out-slide", str(tmp_path / "b.png"), "--stores", str(cohort["stores"][0]),
            "--out-thumbnails", str(tmp_path / "t.png")]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no patch store given for slide" in err[0]
    assert not any(tmp_path.iterdir())


def test_figures_are_written_in_the_format_their_suffix_names(tmp_path):
    import matplotlib.pyplot as plt

    from simclr_path.errors import SimclrPathError
    from simclr_path.figures import save_figure

    for name, magic in (("f.png", b"\x89PNG"), ("f.pdf", b"%PDF"), ("f.jpg", b"\xff\xd8")):
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        assert save_figure(fig, tmp_path / name).read_bytes()[:len(magic)] == magic
    fig, _ = plt.subplots()
    with pytest.raises(SimclrPathError, match=r"f.xyz: matplotlib cannot write .xyz figures"):
        save_figure(fig, tmp_path / "f.xyz")
    assert not (tmp_path / "f.xyz").exists()


def test_result_tables_keep_ids_and_class_names_as_written(tmp_path):
    from simclr_path.figures import _read_table

    csv = tmp_path / "p.csv"
    csv.write_text("slide_id,patient_id,label,fold,score,pred\n001,007,1,0,0.9,1\n"
                   "002,008,NA,1,,0\n")
    df = _read_table(csv, {"slide_id", "label", "fold"}, numeric={"fold", "score"})
    assert df["slide_id"].tolist() == ["001", "002"] and df["patient_id"].tolist() == ["007", "008"]
    assert df["label"].tolist() == ["1", "NA"] and df["pred"].tolist() == ["1", "0"]
    assert df["score"].isna().tolist() == [False, True]


def test_heatmap_averages_overlapping_patches(tmp_path, monkeypatch):
    from simclr_path import figures
    from simclr_path.store import PatchStoreWriter

    # two 16 px patches at stride 8: the middle 8 px belong to both
    with PatchStoreWriter(tmp_path / "s.h5", 16, attrs={"slide_id": "S", "kind": "slide",
                                                        "mpp": 0.5, "level0_mpp": 0.5}) as w:
        w.append(np.full((2, 16, 16, 3), 200, np.uint8), np.array([[0, 0], [8, 0]]))
    pd.DataFrame({"slide_id": ["S", "S"], "x": [0, 8], "y": [0, 0], "score": [0.2, 0.8]}).to_csv(
        tmp_path / "pred.csv", index=False)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "s.h5", tmp_path / "h.png")
    heat = drawn[0].axes[1].get_images()[1].get_array()
    row = heat[8].filled(np.nan)  # a middle row (the first and last pixel of a patch are its border)
    values = sorted({round(float(v), 3) for v in row if np.isfinite(v)})
    assert values == [0.2, 0.5, 0.8], values  # the shared pixels get the mean, not the last


def test_heatmap_patches_side_by_side_share_no_pixel(tmp_path, monkeypatch):
    """A patch border inside a thumbnail pixel gave that pixel the mean of two patches' scores,
    a value no patch has: a grid of false mid values between high and low patches (review)."""
    import itertools

    from simclr_path import figures
    from simclr_path.store import PatchStoreWriter

    # six 16 px patches side by side on a 100 x 16 px slide drawn 30 px wide (3.3 slide px a
    # pixel, so borders at 16, 32, ... fall inside pixels)
    attrs = {"slide_id": "S", "kind": "slide", "mpp": 0.5, "level0_mpp": 0.5,
             "slide_width": 100, "slide_height": 16}
    with PatchStoreWriter(tmp_path / "s.h5", 16, attrs=attrs) as w:
        w.append(np.full((6, 16, 16, 3), 200, np.uint8), np.array([[16 * i, 0] for i in range(6)]))
        w.set_thumbnail(np.full((5, 30, 3), 220, np.uint8))
    scores = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    pd.DataFrame({"slide_id": "S", "x": [16 * i for i in range(6)], "y": 0,
                  "score": scores}).to_csv(tmp_path / "pred.csv", index=False)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "s.h5", tmp_path / "h.png")
    heat = drawn[0].axes[1].get_images()[1].get_array().filled(np.nan)
    assert heat.shape == (5, 30)
    shown = heat[np.isfinite(heat)]
    assert set(np.unique(shown).tolist()) == {0.0, 1.0}  # only the patches' own scores
    row = heat[2]
    # each patch gets the pixels whose centres it covers: 96 slide px are 28.8 pixels
    assert np.isfinite(row[:29]).all() and np.isnan(row[29:]).all()
    runs = [len(list(g)) for _, g in itertools.groupby(row[:29])]
    assert len(runs) == 6 and all(4 <= n <= 5 for n in runs), runs
    # a real grid: coordinates rounded to whole pixels, a footprint that is not whole (16 px at
    # 0.5 um/px on a 0.2527 um/px scan: 31.66 px), so neighbours leave gaps of under a pixel,
    # which left blank stripes across the map where a pixel centre fell in one (review)
    attrs = {**attrs, "level0_mpp": 0.2527, "slide_width": 2000, "slide_height": 64}
    fp = 16 * 0.5 / 0.2527
    xs = [round(i * fp) for i in range(63)]
    with PatchStoreWriter(tmp_path / "g.h5", 16, attrs=attrs) as w:
        w.append(np.full((63, 16, 16, 3), 200, np.uint8), np.array([[x, 0] for x in xs]))
        w.set_thumbnail(np.full((6, 700, 3), 220, np.uint8))  # 2.857 slide px a pixel
    scores = [float(i % 2) for i in range(63)]
    pd.DataFrame({"slide_id": "S", "x": xs, "y": 0, "score": scores}).to_csv(
        tmp_path / "g.csv", index=False)
    figures.plot_heatmap(tmp_path / "g.csv", tmp_path / "g.h5", tmp_path / "g.png")
    heat = drawn[-1].axes[1].get_images()[1].get_array().filled(np.nan)
    covered = heat[0, : int((xs[-1] + fp) / (2000 / 700))]
    assert np.isfinite(covered).all(), np.flatnonzero(~np.isfinite(covered))
    assert set(np.unique(covered).tolist()) == {0.0, 1.0}


def test_heatmap_inputs_with_damaged_coordinates_or_scores_give_one_line(cohort, tmp_path, capsys):
    import shutil

    cls = tmp_path / "cls"
    shutil.copytree(cohort["cls"], cls)
    csv = cls / "predictions_patches.csv"
    csv.write_text(_set_first(csv.read_text(), "x", "abc"))
    pred = tmp_path / "pred.csv"
    pred.write_text("slide_id,x,y,score\nP0-SCC,0,0,high\n")
    gap = tmp_path / "gap.csv"  # drawn as bare slide, left out of the slide mean
    gap.write_text("slide_id,x,y,score\nP0-SCC,0,0,0.5\nP0-SCC,32,0,\n")
    for src, match in ((cls, "no numeric column x"), (pred, "column score is not all numbers"),
                       (gap, ("gap.csv: column score has 1 empty or non-finite value(s) (first "
                              "on row 3); give a CSV written by 'simclr-path predict'"))):
        assert main(["plot-heatmap", "--classify", str(src), "--store", str(cohort["stores"][0]),
                     "--out", str(tmp_path / "h.png")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "h.png").exists()


def test_tsne_categories_are_drawn_interleaved_not_one_over_another():
    import matplotlib.pyplot as plt

    from simclr_path.figures import OKABE_ITO, _scatter_by

    fig, ax = plt.subplots()
    cats = pd.Series(["a"] * 50 + ["b"] * 50)
    xy = np.random.default_rng(0).normal(size=(100, 2))
    _scatter_by(ax, xy, cats, "label")
    drawn = [c for c in ax.collections if len(c.get_offsets())]
    assert len(drawn) == 1 and len(drawn[0].get_offsets()) == 100
    faces = drawn[0].get_facecolors()[:, :3]
    blue = np.isclose(faces, plt.matplotlib.colors.to_rgb(OKABE_ITO[0])).all(axis=1)
    # each point keeps its category's colour, and "b" is not simply drawn after all of "a"
    assert blue.sum() == 50 and 0 < blue[50:].sum() < 50
    offsets = np.asarray(drawn[0].get_offsets())
    for p, is_a in zip(offsets, blue):
        assert is_a == (np.flatnonzero((xy == p).all(axis=1))[0] < 50)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (n=50)", "b (n=50)"]
    plt.close(fig)


def _slide_store(path, width, height, n=4, fp=64):
    """A tiled-slide store of ``width`` x ``height`` level-0 px with a stored thumbnail and ``n``
    patches of ``fp`` px along its diagonal."""
    from simclr_path.store import PatchStoreWriter, shrink

    coords = np.stack([np.linspace(0, width - fp, n), np.linspace(0, height - fp, n)], 1).astype(int)
    thumb = np.full((height, width, 3), 230, np.uint8)
    thumb[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = (150, 60, 140)
    with PatchStoreWriter(path, fp, attrs={"slide_id": "S", "kind": "slide", "mpp": 0.5,
                                           "level0_mpp": 0.5, "slide_width": width,
                                           "slide_height": height}) as w:
        w.set_thumbnail(shrink(thumb, 1024))
        w.append(np.full((n, fp, fp, 3), 200, np.uint8), coords)
    return coords


@pytest.mark.parametrize("width, height", [(4000, 1000), (1000, 3000), (2000, 2000)])
def test_heatmap_colour_bar_spans_the_image_and_names_the_predict_csvs_class(
        tmp_path, monkeypatch, width, height):
    from simclr_path import figures

    coords = _slide_store(tmp_path / "s.h5", width, height)
    p = np.linspace(0.1, 0.9, len(coords))
    # a 'predict' CSV: score copies prob_SCC, the positive class's column
    pd.DataFrame({"level": "patch", "slide_id": "S", "x": coords[:, 0], "y": coords[:, 1],
                  "prob_normal": 1 - p, "prob_SCC": p, "score": p}).to_csv(
        tmp_path / "pred.csv", index=False)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "s.h5", tmp_path / "h.png")
    fig = drawn[0]
    fig.canvas.draw()
    heat_ax = fig.axes[1]
    bar_ax = next(a for a in fig.axes if a.get_ylabel() == "P(SCC)")
    assert "P(SCC) per patch" in heat_ax.get_title()
    # the slide id once, above both panels (in each title a long id ran into the other)
    assert fig._suptitle.get_text() == "slide S" and not heat_ax.get_title().startswith("S:")
    img, bar = heat_ax.get_window_extent(), bar_ax.get_window_extent()
    title = heat_ax.title.get_window_extent()
    # the bar is as tall as the (aspect-kept) image, right of it, and below the panel's title
    # (on a wide slide it used to stand above the image, over the title)
    assert abs(bar.y0 - img.y0) < 2 and abs(bar.y1 - img.y1) < 2, (img, bar)
    assert bar.x0 >= img.x1 and bar.y1 <= title.y0
    # the bar shows the colour map itself, opaque (at the map's alpha it was paler)
    from matplotlib.collections import QuadMesh

    solids = next(c for c in bar_ax.collections if isinstance(c, QuadMesh))
    assert solids.get_alpha() in (None, 1.0)
    assert solids.get_cmap().name == heat_ax.images[-1].get_cmap().name == "viridis"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_heatmap_of_a_predict_csv_without_a_matching_prob_column_says_positive_class(
        tmp_path, monkeypatch):
    from simclr_path import figures

    coords = _slide_store(tmp_path / "s.h5", 1000, 1000)
    pd.DataFrame({"slide_id": "S", "x": coords[:, 0], "y": coords[:, 1],
                  "score": [0.2, 0.4, 0.6, 0.8]}).to_csv(tmp_path / "pred.csv", index=False)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "s.h5", tmp_path / "h.png")
    assert "P(positive class) per patch" in drawn[0].axes[1].get_title()


def test_heatmap_of_a_macro_models_predict_csv_says_it_has_no_positive_class(tmp_path):
    """It said the CSV lacked a score column and to give one written by predict, which it was."""
    from simclr_path import figures
    from simclr_path.errors import SimclrPathError

    coords = _slide_store(tmp_path / "s.h5", 1000, 1000)
    p = np.array([0.2, 0.4, 0.6, 0.8])
    pd.DataFrame({"level": "patch", "slide_id": "S", "x": coords[:, 0], "y": coords[:, 1],
                  "prob_aca": p / 2, "prob_n": p / 2, "prob_scc": 1 - p}).to_csv(
        tmp_path / "pred.csv", index=False)
    with pytest.raises(SimclrPathError, match=r"pred.csv: predictions of a model without a "
                                              r"positive class .* classify again with "
                                              r"classify.positive_label set"):
        figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "s.h5", tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()


def test_a_coarse_stored_thumbnail_gives_way_to_the_slide_file(tmp_path):
    import shutil

    from conftest import SLIDES

    slide = SLIDES / "cmu-1-small-region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} not available")
    from simclr_path.config import TileConfig
    from simclr_path.figures import slide_thumbnail
    from simclr_path.store import PatchStore
    from simclr_path.tiling import tile_slide

    # a single-level slide tiled without --qc stores the tissue mask's small picture
    local = shutil.copy(slide, tmp_path / "cmu.svs")
    tile_slide(local, tmp_path / "s.h5", TileConfig(mpp=4.0, patch_size=64), progress=False)
    with PatchStore(tmp_path / "s.h5") as st:
        stored = max(st.thumbnail.shape[:2])
        assert stored < 512
        img, extent = slide_thumbnail(st, max_side=1024)
        assert max(img.shape[:2]) == 1024 and extent == (0.0, 2220.0, 2967.0, 0.0)
        # sharp enough for what is asked: the stored one, no slide read
        img, _ = slide_thumbnail(st, max_side=stored)
        assert max(img.shape[:2]) == stored
    (tmp_path / "cmu.svs").unlink()  # the slide is gone: the stored picture still serves
    with PatchStore(tmp_path / "s.h5") as st:
        img, extent = slide_thumbnail(st, max_side=1024)
        assert max(img.shape[:2]) == stored and extent == (0.0, 2220.0, 2967.0, 0.0)


def _binary_classify_dir(folder, labels, n_in_metrics=None):
    import json

    folder.mkdir()
    n = len(labels)
    s = np.linspace(0.1, 0.9, n)
    patches = pd.DataFrame({"slide_id": [f"s{i % 4}" for i in range(n)], "label": labels,
                            "fold": 0, "prob_SCC": s, "prob_normal": 1 - s, "score": s})
    patches.to_csv(folder / "predictions_patches.csv", index=False)
    slides = patches.groupby("slide_id").agg({"label": "first", "prob_SCC": "mean",
                                              "prob_normal": "mean", "score": "mean"})
    slides["score_topk"] = slides["score"]
    slides.reset_index().to_csv(folder / "predictions_slides.csv", index=False)
    cm = [[0, 0], [0, 0]]
    (folder / "metrics.json").write_text(json.dumps({
        "task": {"classes": ["SCC", "normal"], "positive": "SCC", "top_k": 2,
                 "evaluation": "grouped_2fold"},
        "patch": {"n": n if n_in_metrics is None else n_in_metrics, "confusion_matrix": cm},
        "slide": {"n": len(slides), "confusion_matrix": cm}}))


def test_curves_of_one_class_say_so_in_the_panel_without_legend_warnings(tmp_path, monkeypatch):
    import warnings

    from simclr_path import figures

    _binary_classify_dir(tmp_path / "cls", ["SCC"] * 20)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures.plot_curves(tmp_path / "cls", tmp_path / "roc.png", tmp_path / "pr.png")
    assert not [w for w in caught if "No artists with labels" in str(w.message)]
    for fig in drawn:  # ROC and PR
        for ax, things in zip(fig.axes, ("patches", "slides")):
            notes = [t.get_text() for t in ax.texts]
            assert any(f"only one class among the held-out {things}" in t for t in notes), notes


def test_curves_refuse_predictions_that_disagree_with_metrics_json(tmp_path, capsys):
    _binary_classify_dir(tmp_path / "cls", ["SCC", "normal"] * 10, n_in_metrics=25)
    argv = ["plot-curves", "--classify", str(tmp_path / "cls"), "--out-roc",
            str(tmp_path / "r.png"), "--out-pr", str(tmp_path / "p.png")]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predictions_patches.csv: 20 held-out patch rows but metrics.json " \
        "counts 25" in err[0], err
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "p.png").exists()


def test_preview_takes_image_size_for_small_patches(tmp_path, make_store, capsys):
    store = make_store(n=8, size=64)
    out = tmp_path / "v.png"
    # the default 224 px views do not fit 64 px patches: the hint names this command's option
    assert main(["preview", str(store), "--out", str(out), "--pairs", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-size 64 or less" in err[0], err
    assert main(["preview", str(store), "--out", str(out), "--pairs", "2",
                 "--image-size", "64"]) == 0
    _assert_png_not_blank(out)



def test_preview_takes_local_crops_as_pretrain_does(tmp_path, make_store, capsys):
    """pretrain --local-crops K trains K small views per patch; preview drew none of them."""
    from PIL import Image

    store = make_store(n=8, size=64)
    common = ["preview", str(store), "--pairs", "2", "--image-size", "48"]
    assert main([*common, "--out", str(tmp_path / "two.png"), "--local-crops", "0"]) == 0
    assert main([*common, "--out", str(tmp_path / "six.png"), "--local-crops", "4"]) == 0
    two, six = Image.open(tmp_path / "two.png"), Image.open(tmp_path / "six.png")
    assert six.width > two.width * 1.5 and six.height == two.height
    assert main([*common, "--out", str(tmp_path / "bad.png"), "--local-crops", "-1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "local_crops" in err[0], err
    assert not (tmp_path / "bad.png").exists()

# ---------------------------------------------------------------------------------------------
# A store found by slide id must hold the very patches the predictions / embeddings were made
# from: two tilings of one slide (another --mpp, patch size or stride) share the slide id
# ---------------------------------------------------------------------------------------------
def _other_tiling(path, sid="P0-SCC", grid=6, step=32, offset=0, size=16, mpp=0.5):
    """A store of slide ``sid`` tiled otherwise than the cohort's (6 x 6 patches of 16 px at
    0.5 um/px, 32 level-0 px apart from (0, 0))."""
    from simclr_path.store import PatchStoreWriter

    coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2)
    coords = coords * step + offset
    with PatchStoreWriter(path, size, attrs={"slide_id": sid, "kind": "slide", "mpp": mpp,
                                             "level0_mpp": 0.25}) as w:
        w.append(np.full((len(coords), size, size, 3), 120, np.uint8), coords)
    return path


def _heatmap_fails(argv, out, capsys, *match):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(m in err[0] for m in match), err
    assert "Traceback" not in err[0] and not out.exists()


def test_heatmap_refuses_predictions_of_another_tiling_of_the_slide(cohort, tmp_path, capsys):

    from simclr_path.classify import predict

    fewer = _other_tiling(tmp_path / "mpp1.h5", grid=3, step=64, mpp=1.0)  # 9 patches, not 36
    shifted = _other_tiling(tmp_path / "shifted.h5", offset=16)  # 36 patches, other places
    pred = predict(cohort["cls"], cohort["embs"][:1], tmp_path / "pred.csv")
    # a training slide of a split is drawn without predictions, but its store is still checked
    train = _with_a_training_slide(cohort, tmp_path / "train")
    out = tmp_path / "hm.png"
    for src in (cohort["cls"], pred, train):
        table = src if src == pred else src / "predictions_patches.csv"
        argv = ["plot-heatmap", "--classify", str(src), "--out", str(out), "--store"]
        _heatmap_fails([*argv, str(fewer)], out, capsys, f"{fewer}: not the patches",
                       f"predictions in {table}", "9 patches in the store, 36 in the predictions",
                       "another tiling of slide 'P0-SCC'", "source store")
        _heatmap_fails([*argv, str(shifted)], out, capsys, f"{shifted}: not the patches",
                       "patch 0 is at (x, y) = (16, 16) in the store, (0, 0) in the predictions")
        # the store the embeddings were made from still draws
        assert main([*argv, str(cohort["stores"][0])]) == 0, capsys.readouterr().err
        assert out.stat().st_size > 0
        out.unlink()


def test_heatmap_checks_coordinates_without_patch_indices(cohort, tmp_path, capsys):
    # a CSV with no patch_index (hand-made or older): the same places, in any order
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 32
    pred = tmp_path / "pred.csv"
    pd.DataFrame({"slide_id": "P0-SCC", "x": coords[::-1, 0], "y": coords[::-1, 1],
                  "score": np.linspace(0, 1, 36)}).to_csv(pred, index=False)
    out = tmp_path / "hm.png"
    shifted = _other_tiling(tmp_path / "shifted.h5", offset=16)
    _heatmap_fails(["plot-heatmap", "--classify", str(pred), "--store", str(shifted), "--out",
                    str(out)], out, capsys,
                   "no patch of the store at (x, y) = (160, 160) where the predictions have one")
    assert main(["plot-heatmap", "--classify", str(pred), "--store", str(cohort["stores"][0]),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    # a damaged patch index is named as such, not as another tiling
    pd.DataFrame({"slide_id": "P0-SCC", "patch_index": ["a"] + list(range(1, 36)),
                  "x": coords[:, 0], "y": coords[:, 1], "score": 0.5}).to_csv(pred, index=False)
    out.unlink()
    _heatmap_fails(["plot-heatmap", "--classify", str(pred), "--store", str(cohort["stores"][0]),
                    "--out", str(out)], out, capsys,
                   f"{pred}: column patch_index is not all whole numbers")


def _tsne_argv(cohort, tmp_path, stores, embs=None):
    return ["plot-tsne", "--embeddings", *map(str, embs or cohort["embs"]), "--samples",
            str(cohort["sheet"]), "--out-label", str(tmp_path / "a.png"), "--out-slide",
            str(tmp_path / "b.png"), "--stores", *map(str, stores), "--out-thumbnails",
            str(tmp_path / "c.png"), "--max-points", "200"]


def test_tsne_thumbnails_refuse_a_store_of_another_tiling_before_writing(cohort, tmp_path,
                                                                         capsys):
    outs = tmp_path / "out"
    outs.mkdir()
    fewer = _other_tiling(tmp_path / "mpp1.h5", grid=3, step=64, mpp=1.0)
    shifted = _other_tiling(tmp_path / "shifted.h5", offset=16)
    for store, match in ((fewer, "9 patches in the store, 36 in the embeddings"),
                         (shifted, "patch 0 is at (x, y) = (16, 16) in the store")):
        # fewer patches than the embeddings used to end in an IndexError after a.png and b.png
        assert main(_tsne_argv(cohort, outs, [store, *cohort["stores"][1:]])) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{store}: not the patches {cohort['embs'][0]} was embedded " \
            "from" in err[0] and match in err[0] and "another tiling of slide 'P0-SCC'" in err[0]
        assert not any(outs.iterdir())  # nothing written, not even the first two maps


def test_tsne_of_nan_features_is_one_line_naming_the_file(cohort, tmp_path, capsys):
    """sklearn's "Input X contains NaN" traceback (classify and predict refuse such files)."""
    from simclr_path.store import EmbeddingStore, write_embeddings

    e = EmbeddingStore(cohort["embs"][0])
    feats = e.features.copy()
    feats[:, 3] = np.nan  # every row: whatever the sample draws
    bad = write_embeddings(tmp_path / "P0-SCC.h5", feats, e.coords, {"slide_id": "P0-SCC"})
    outs = tmp_path / "out"
    outs.mkdir()
    argv = _tsne_argv(cohort, outs, cohort["stores"], [bad, *cohort["embs"][1:]])
    assert main(argv[:argv.index("--stores")] + ["--max-points", "200"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: patch row(s) hold NaN, infinite" in err[0], err
    assert not any(outs.iterdir())


def test_tsne_thumbnails_compare_patch_size_and_mpp_and_name_the_source_store(cohort, tmp_path,
                                                                              capsys):
    from simclr_path.store import EmbeddingStore, write_embeddings

    # the same places and count at twice the resolution: only embed's attributes tell
    finer = _other_tiling(tmp_path / "finer.h5", size=32, mpp=0.25)
    e = EmbeddingStore(cohort["embs"][0])
    emb = write_embeddings(tmp_path / "P0-SCC.h5", e.features, e.coords, {
        "slide_id": "P0-SCC", "source_store": str(cohort["stores"][0]), "mpp": 0.5,
        "patch_size": 16})
    embs = [emb, *cohort["embs"][1:]]
    outs = tmp_path / "out"
    outs.mkdir()
    assert main(_tsne_argv(cohort, outs, [finer, *cohort["stores"][1:]], embs)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "patch_size 32 in the store, 16 in the embeddings" in err[0], err
    assert f"(it was embedded from {cohort['stores'][0]})" in err[0]
    assert not any(outs.iterdir())
    # both tilings given: each embedding file gets the store of its own patches
    assert main(_tsne_argv(cohort, outs, [finer, *cohort["stores"]], embs)) == 0, \
        capsys.readouterr().err
    for name in ("a.png", "b.png", "c.png"):
        _assert_png_not_blank(outs / name)


def test_tsne_store_lookup_prefers_the_matching_store(cohort, tmp_path):
    from simclr_path.figures import _stores_for

    shifted = _other_tiling(tmp_path / "shifted.h5", offset=16)
    for stores in ([shifted, cohort["stores"][0]], [cohort["stores"][0], shifted]):
        opened = _stores_for(stores, cohort["embs"], [0, 0])
        assert list(opened) == [0] and opened[0].path == cohort["stores"][0]


def test_figure_functions_keep_existing_files_without_force(cohort, tmp_path):
    """As every stage function and the CLI: an existing figure is replaced only with force, and
    a figure never replaces one of the files it is drawn from."""
    from simclr_path import figures
    from simclr_path.errors import SimclrPathError

    pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.0], "lr": [1e-3] * 3}).to_csv(
        tmp_path / "metrics.csv", index=False)
    out = figures.plot_loss_curve(tmp_path, tmp_path / "loss.png")  # the run directory
    _assert_png_not_blank(out)
    with pytest.raises(SimclrPathError, match="already exists; pass --force"):
        figures.plot_loss_curve(tmp_path / "metrics.csv", out)
    figures.plot_loss_curve(tmp_path / "metrics.csv", out, force=True)
    (tmp_path / "cm.png").write_text("mine")
    with pytest.raises(SimclrPathError, match="already exists"):
        figures.plot_confusion(cohort["cls"], tmp_path / "cm.png")
    with pytest.raises(SimclrPathError, match="already exists"):  # before the ROC is written
        figures.plot_curves(cohort["cls"], tmp_path / "roc.png", tmp_path / "cm.png")
    with pytest.raises(SimclrPathError, match="already exists"):
        figures.plot_tsne(cohort["embs"], tmp_path / "label.png", tmp_path / "cm.png")
    assert not (tmp_path / "roc.png").exists() and not (tmp_path / "label.png").exists()
    assert (tmp_path / "cm.png").read_text() == "mine"
    store = cohort["stores"][0]
    before = store.read_bytes()
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(store\)"):
        figures.plot_heatmap(cohort["cls"], store, store, force=True)
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(embedding_paths\)"):
        figures.plot_tsne(str(cohort["embs"][0]), tmp_path / "l.png", cohort["embs"][0],
                          force=True)
    assert store.read_bytes() == before


def test_curve_panel_titles_do_not_run_into_each_other(tmp_path, monkeypatch):
    """Counts of a real cohort and a CI made one-line titles wider than their panels."""
    import json

    from simclr_path import figures

    _binary_classify_dir(tmp_path / "cls", (["SCC"] * 6965 + ["normal"] * 11575))
    p = pd.read_csv(tmp_path / "cls" / "predictions_patches.csv")
    p["slide_id"] = [f"slide-{i % 26:02d}" for i in range(len(p))]  # 26 slides of one label each
    p["label"] = np.where(p.index % 26 < 10, "SCC", "normal")
    p.to_csv(tmp_path / "cls" / "predictions_patches.csv", index=False)
    sl = p.groupby("slide_id").agg({"label": "first", "prob_SCC": "mean", "prob_normal": "mean",
                                    "score": "mean"})
    sl["score_topk"] = sl["score"]
    sl["patient_id"] = [f"P{i // 2}" for i in range(len(sl))]  # two slides a patient
    sl.reset_index().to_csv(tmp_path / "cls" / "predictions_slides.csv", index=False)
    m = json.loads((tmp_path / "cls" / "metrics.json").read_text())
    m["slide"]["auroc_ci95"], m["slide"]["n"] = [0.83, 1.0], 26
    (tmp_path / "cls" / "metrics.json").write_text(json.dumps(m))
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_curves(tmp_path / "cls", tmp_path / "roc.png", tmp_path / "pr.png")
    roc = drawn[0]
    roc.canvas.draw()
    left, right = (ax.title.get_window_extent() for ax in roc.axes[:2])
    assert left.x1 < right.x0, (roc.axes[0].get_title(), roc.axes[1].get_title())
    assert "10 positive, 16 negative" in roc.axes[1].get_title()
    # two slide curves (mean and top-k): the CI names the one it was computed for
    assert "mean of patches AUROC 95% CI 0.830-1.000" in roc.axes[1].get_title()
    # with its band over the curve it belongs to, in its colour, resampled by patient
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    bands = [c for c in roc.axes[1].collections if isinstance(c, PolyCollection)]
    assert [b.get_label() for b in bands] == ["mean of patches: 95% band (patient bootstrap)"]
    mean_line = next(ln for ln in roc.axes[1].lines if ln.get_label().startswith("mean of"))
    assert np.allclose(bands[0].get_facecolor()[0][:3],
                       to_rgb(mean_line.get_color()))
    assert not [c for c in roc.axes[0].collections if isinstance(c, PolyCollection)]
    # and without one, the panel says why (it was left out without a word)
    m["slide"]["auroc_ci95"] = None
    m["slide"]["auroc_ci95_note"] = ("CI not shown: 4 patients per class (a patient bootstrap "
                                     "needs at least 5 per class)")
    (tmp_path / "cls" / "metrics.json").write_text(json.dumps(m))
    drawn.clear()
    figures.plot_curves(tmp_path / "cls", tmp_path / "roc.png", tmp_path / "pr.png")
    title = drawn[0].axes[1].get_title()
    assert "10 positive, 16 negative; CI not shown: 4 patients per class" in title, title
    assert not [c for c in drawn[0].axes[1].collections if isinstance(c, PolyCollection)]
    assert "CI not shown" not in drawn[1].axes[1].get_title()  # precision-recall has no CI


def test_roc_band_resamples_patients_and_holds_the_curve():
    from sklearn.metrics import roc_curve

    from simclr_path.figures import roc_band

    rng = np.random.default_rng(0)
    truth = np.repeat([True, False], 40)
    score = rng.normal(size=80) + 1.0 * truth
    patients = np.array([f"P{i // 2}" for i in range(80)])  # two slides a patient
    grid, lo, hi = roc_band(truth, score, patients, n=400)
    fpr, tpr, _ = roc_curve(truth, score)
    point = np.interp(grid, fpr, tpr)
    assert grid[0] == 0 and grid[-1] == 1 and len(grid) == len(lo) == len(hi) == 101
    assert (lo <= hi).all() and (np.diff(lo) >= -1e-12).all()  # a band of ROC curves: rising
    assert np.mean((lo <= point + 1e-9) & (point <= hi + 1e-9)) > 0.95
    assert 0.05 < np.mean(hi - lo) < 0.6
    # resampling 40 patients, not 80 slides: slides of one patient scoring alike widen it
    twin = np.repeat(rng.normal(size=40), 2) + 1.0 * truth
    wide = roc_band(truth, twin, patients, n=400)
    narrow = roc_band(truth, twin, np.arange(80), n=400)
    assert np.mean(wide[2] - wide[1]) > np.mean(narrow[2] - narrow[1])
    assert roc_band(np.ones(10, bool), np.arange(10.0), np.arange(10)) is None  # one class


@pytest.mark.parametrize(("steps", "curves"), [
    (1, ["loss"]),
    (3, ["loss"]),
    (60, ["loss", "loss (centred moving mean of 3 logged steps)"]),
])
def test_the_loss_curve_has_whole_step_ticks_and_a_moving_mean_only_where_it_smooths(
        tmp_path, monkeypatch, steps, curves):
    from simclr_path import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    pd.DataFrame({"step": range(1, steps + 1), "loss": np.linspace(4, 2, steps),
                  "lr": [1e-3] * steps}).to_csv(tmp_path / "metrics.csv", index=False)
    figures.plot_loss_curve(tmp_path, tmp_path / "loss.png")
    ax = drawn[0].axes[0]
    drawn[0].canvas.draw()
    assert [ln.get_label() for ln in ax.get_lines()] == curves
    assert all(float(t).is_integer() for t in ax.get_xticks())
    # a short run's steps are points (one logged step was an invisible one-point line)
    assert (ax.get_lines()[0].get_marker() == "o") == (steps <= 30)
    if len(curves) == 2:  # centred: on a falling line it does not lag above the loss
        raw, smooth = (np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()[:2])
        np.testing.assert_allclose(smooth[1:-1], raw[1:-1])


def test_the_loss_curve_marks_where_the_loss_stopped_being_finite(tmp_path, monkeypatch):
    """NaN and inf rows were left out in silence: the moving mean ran on past them."""
    from simclr_path import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    loss = np.linspace(4, 2, 60)
    loss[40], loss[50:] = np.inf, np.nan
    pd.DataFrame({"step": range(60), "loss": loss}).to_csv(tmp_path / "metrics.csv", index=False)
    figures.plot_loss_curve(tmp_path, tmp_path / "loss.png")
    lines = {ln.get_label(): ln for ln in drawn[0].axes[0].get_lines()}
    mark = lines["loss NaN or infinite (11 logged steps, from step 40)"]
    assert list(mark.get_xdata()) == [40, 40]
    smooth = np.asarray(lines["loss (centred moving mean of 3 logged steps)"].get_ydata(), float)
    assert np.isnan(smooth[50:]).all() and np.isnan(smooth[40]) and np.isfinite(smooth[:40]).all()


def test_user_text_with_a_dollar_sign_is_drawn_as_written(tmp_path, cohort, monkeypatch):
    """mathtext parsed it: an unbalanced '$' in a title was a traceback, a pair was mangled."""
    import shutil

    import matplotlib

    from simclr_path import figures

    pd.DataFrame({"step": [1, 2], "loss": [3.0, 2.0]}).to_csv(tmp_path / "metrics.csv", index=False)
    _assert_png_not_blank(figures.plot_loss_curve(tmp_path, tmp_path / "loss.png",
                                                  title=r"loss $\alpha_$ run"))
    # class names reach legends and titles: a '$' pair in one is not maths either
    cls = tmp_path / "cls"
    shutil.copytree(cohort["cls"], cls)
    for name in ("metrics.json", "predictions_patches.csv", "predictions_slides.csv"):
        f = cls / name
        f.write_text(f.read_text().replace("normal", "n$o$rmal"))
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    figures.plot_curves(cls, tmp_path / "roc.png", tmp_path / "pr.png")
    figures.plot_confusion(cls, tmp_path / "conf.png")
    # a heatmap's run name (free text on the command line)
    from simclr_path.store import PatchStoreWriter

    with PatchStoreWriter(tmp_path / "s.h5", 16, attrs={"slide_id": "S", "kind": "slide",
                                                        "mpp": 0.5, "level0_mpp": 0.5}) as w:
        w.append(np.full((2, 16, 16, 3), 200, np.uint8), np.array([[0, 0], [16, 0]]))
    pd.DataFrame({"slide_id": "S", "x": [0, 16], "y": 0, "score": [0.2, 0.8]}).to_csv(
        tmp_path / "pred.csv", index=False)
    figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "s.h5", tmp_path / "h.png",
                         run_name="n$o$rmal")
    for fig in drawn:
        fig.canvas.draw()
    texts = [t for fig in drawn for t in fig.findobj(matplotlib.text.Text)
             if "n$o$rmal" in t.get_text()]
    assert any("n$o$rmal" in t.get_text() for t in drawn[-1].findobj(matplotlib.text.Text))
    assert texts and not any(t.get_parse_math() for t in texts)
    assert matplotlib.rcParams["text.parse_math"]  # the caller's own setting is left alone


def test_every_figure_suffix_is_checked_before_any_work(cohort, tmp_path, capsys):
    """plot-curves wrote the ROC PNG, then failed on the PR path's suffix; plot-tsne ran the
    whole t-SNE and left its first map."""
    for argv in (["plot-curves", "--classify", str(cohort["cls"]), "--out-roc",
                  str(tmp_path / "r.png"), "--out-pr", str(tmp_path / "p.xyz")],
                 ["plot-tsne", "--embeddings", *map(str, cohort["embs"][:2]), "--out-label",
                  str(tmp_path / "l.png"), "--out-slide", str(tmp_path / "s.xyz")]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "matplotlib cannot write .xyz figures" in err[0], err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("slide_id", [None, "lung_scc-0"])
def test_a_heatmap_of_imported_tiles_says_why_whatever_the_slide_id(tmp_path, slide_id):
    """Imported tiles have no slide coordinates: the one error, with or without --slide-id (the
    slide-id advice sent a user round in a circle)."""
    from simclr_path import figures
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import PatchStoreWriter

    with PatchStoreWriter(tmp_path / "tiles.h5", 16, attrs={"slide_id": "tiles",
                                                           "kind": "patches"}) as w:
        w.append(np.zeros((2, 16, 16, 3), np.uint8), np.full((2, 2), -1))
    pd.DataFrame({"slide_id": ["lung_scc-0"] * 2, "x": [-1, -1], "y": [-1, -1],
                  "score": [0.2, 0.8]}).to_csv(tmp_path / "pred.csv", index=False)
    with pytest.raises(SimclrPathError, match="no slide coordinates \\(imported tiles\\)"):
        figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "tiles.h5", tmp_path / "h.png",
                             slide_id=slide_id)


def test_plot_tsne_checks_its_arguments_in_python_too(cohort, tmp_path):
    """The CLI checked them through the config; in Python 0 became the default, -5 failed in
    numpy, and a samples DataFrame was printed whole into the error."""
    from simclr_path.errors import SimclrPathError
    from simclr_path.figures import plot_tsne

    out = (tmp_path / "a.png", tmp_path / "b.png")
    for kw, match in (({"max_points": 0}, r"plot_tsne: classify.tsne_max_points must be between 10"),
                      ({"max_points": -5}, r"tsne_max_points must be between 10"),
                      ({"perplexity": -1}, r"plot_tsne: classify.tsne_perplexity must be > 0"),
                      ({"seed": -1}, r"plot_tsne: seed must be an integer >= 0, got -1")):
        with pytest.raises(SimclrPathError, match=match):
            plot_tsne(cohort["embs"], *out, **kw)
    sheet = pd.read_csv(cohort["sheet"], sep="\t").iloc[:3]
    with pytest.raises(SimclrPathError) as err:
        plot_tsne(cohort["embs"], *out, samples=sheet)
    assert "is not in the samples table" in str(err.value) and "\n" not in str(err.value)
    assert not any(p.exists() for p in out)


def test_curve_and_confusion_titles_name_the_evaluation_in_words(cohort, tmp_path, monkeypatch):
    from simclr_path import figures

    assert figures.evaluation_words("grouped_4fold") == "patient-grouped 4-fold cross-validation"
    assert figures.evaluation_words("split") == "held-out test split of the samples sheet"
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    figures.plot_curves(cohort["cls"], tmp_path / "r.png", tmp_path / "p.png")
    figures.plot_confusion(cohort["cls"], tmp_path / "c.png")
    for fig in drawn:
        assert "(patient-grouped 4-fold cross-validation)" in fig._suptitle.get_text()


def test_drawing_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """figures and qc called matplotlib.use("Agg") on import: in a notebook, inline plots
    stopped appearing after the first pretrain (which draws loss.png) or tiling with a QC."""
    import subprocess
    import sys

    pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.0], "lr": [1e-3] * 3}).to_csv(
        tmp_path / "metrics.csv", index=False)
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import simclr_path.figures as F, simclr_path.qc, simclr_path.transforms\n"
        f"F.plot_loss_curve({str(tmp_path / 'metrics.csv')!r}, {str(tmp_path / 'l.png')!r})\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
    _assert_png_not_blank(tmp_path / "l.png")


def test_heatmap_refuses_a_thumbnail_too_small_to_show(cohort, tmp_path):
    """max_side 0 drew the heatmap over a blank 1x1 px background without a word."""
    from simclr_path.errors import SimclrPathError
    from simclr_path.figures import plot_heatmap

    with pytest.raises(SimclrPathError, match="plot_heatmap: max_side must be an integer >= 64"):
        plot_heatmap(cohort["cls"], cohort["stores"][0], tmp_path / "h.png", max_side=0)
    assert not (tmp_path / "h.png").exists()


def test_the_heatmaps_slide_id_stands_just_above_the_panels(cohort, monkeypatch):
    """It stood at the figure's top, an inch of empty figure above the square panels."""
    from simclr_path import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_heatmap(cohort["cls"], cohort["stores"][0], "unused.png")
    (fig,) = drawn
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    panels = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes if ax.get_title())
    gap = (fig._suptitle.get_window_extent(renderer).y0 - panels) / fig.dpi  # inches
    assert 0 <= gap < 0.3, gap


def test_every_figure_command_names_the_run_it_is_given(cohort, tmp_path, monkeypatch):
    """A figure copied out of the report or results/figures/{run}/ said which run drew it only
    for the loss curve; the workflow gives each figure command --run-name."""
    from simclr_path import figures

    titles = []

    def keep(fig, out, force=False):
        fig.canvas.draw()
        titles.append(fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title())
        return out

    monkeypatch.setattr(figures, "save_figure", keep)
    pd.DataFrame({"step": [0, 1], "loss": [5.0, 4.0]}).to_csv(tmp_path / "metrics.csv",
                                                               index=False)
    cls, store, run = str(cohort["cls"]), str(cohort["stores"][0]), ["--run-name", "base-2"]
    calls = [
        ["plot-loss", str(tmp_path), "--out", str(tmp_path / "l.png")],
        ["plot-curves", "--classify", cls, "--out-roc", str(tmp_path / "r.png"),
         "--out-pr", str(tmp_path / "p.png")],
        ["plot-confusion", "--classify", cls, "--out", str(tmp_path / "c.png")],
        ["plot-heatmap", "--classify", cls, "--store", store, "--out", str(tmp_path / "h.png")],
        ["plot-tsne", "--embeddings", *map(str, cohort["embs"]), "--samples",
         str(cohort["sheet"]), "--out-label", str(tmp_path / "t1.png"), "--out-slide",
         str(tmp_path / "t2.png"), "--stores", *map(str, cohort["stores"]), "--out-thumbnails",
         str(tmp_path / "t3.png"), "--max-points", "60"],
        ["preview", store, "--out", str(tmp_path / "v.png"), "--image-size", "16", "--pairs", "2"],
    ]
    for args in calls:
        assert main(args + run) == 0, args
    assert len(titles) == 9 and all(t.startswith("run base-2: ") for t in titles), titles
    # without it, the titles are as before: no empty "run :" prefix
    titles.clear()
    assert main(calls[2]) == 0 and titles == [titles[0]] and not titles[0].startswith("run")
    with pytest.raises(figures.SimclrPathError):
        figures.with_run("x", 3)


def test_the_heatmap_says_which_folds_its_fold_number_counts_among(cohort, monkeypatch):
    """'held out in fold 0' read as a slip in a pathologist's review: the predictions' fold
    column counts from 0, and the title says so by the range."""
    from simclr_path import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=True: drawn.append(fig))
    figures.plot_heatmap(cohort["cls"], cohort["stores"][0], "unused.png")
    folds = pd.read_csv(cohort["cls"] / "predictions_patches.csv")
    fold = int(folds.loc[folds["slide_id"] == "P0-SCC", "fold"].iloc[0])
    assert drawn[0].axes[0].get_title().endswith(f"held out in fold {fold} of 0-3)")


def test_a_class_wears_one_colour_on_the_tsne_map_and_the_curves():
    """The t-SNE map coloured classes in sorted order and the ROC/PR curves in the config's
    order: side by side in the report, blue was one class on one and another on the other."""
    import matplotlib.colors as mcolors
    import pandas as pd

    from simclr_path.figures import _curve_colors, _scatter_by, class_colors, new_figure

    classes = ["normal", "SCC", "adeno"]  # the config's order, not sorted
    want = class_colors(classes)
    assert len(set(want.values())) == 3
    curves = [(f"{c} vs rest", None, None) for c in classes]
    got = _curve_colors({"task": {"classes": classes, "positive": None}}, curves)
    assert got == [want[c] for c in classes]
    binary = _curve_colors({"task": {"classes": ["normal", "SCC"], "positive": "SCC"}},
                           [("SCC vs rest",), ("mean of patches",), ("top-10 mean",)])
    scc = class_colors(["normal", "SCC"])["SCC"]
    assert binary[:2] == [scc, scc] and binary[2] not in class_colors(["normal", "SCC"]).values()
    _fig, ax = new_figure(figsize=(4, 4))
    labels = pd.Series(["adeno", "SCC", "normal", "SCC", "adeno", "normal"])
    _scatter_by(ax, np.random.default_rng(0).normal(size=(6, 2)), labels, "label")
    handles, names = ax.get_legend_handles_labels()
    for h, name in zip(handles, names):
        name = name.split(" (n=")[0]
        assert mcolors.to_hex(h.get_facecolor()[0]) == mcolors.to_hex(want[name]), name
    # a class the t-SNE sample missed ("SCC") does not shift the others' colours
    _fig, ax = new_figure(figsize=(4, 4))
    _scatter_by(ax, np.random.default_rng(0).normal(size=(4, 2)),
                pd.Series(["adeno", "normal"] * 2), "label", classes)
    for h, name in zip(*ax.get_legend_handles_labels()):
        name = name.split(" (n=")[0]
        assert mcolors.to_hex(h.get_facecolor()[0]) == mcolors.to_hex(want[name]), name


def test_a_slide_legend_names_only_slides_it_can_tell_apart():
    """With 10-12 slides the legend listed viridis colours two of which were the same purple,
    and 60-character TCGA ids made it as wide as the map."""
    import pandas as pd

    from simclr_path.figures import TOL_MUTED, _scatter_by, new_figure

    rng = np.random.default_rng(0)
    tcga = "TCGA-A0-A0SB-01Z-00-DX1.B34C267B-CAA4-4BDE-9BB9-3F9C8C3E6B7E"
    few = pd.Series([f"{tcga}-{i}" for i in range(len(TOL_MUTED))] * 3)
    _fig, ax = new_figure(figsize=(4, 4))
    _scatter_by(ax, rng.normal(size=(len(few), 2)), few, "slide")
    names = ax.get_legend_handles_labels()[1]
    assert len(names) == len(TOL_MUTED) and all(
        len(n.split(" (n=")[0]) <= 32 and n.endswith(f"-{i} (n=3)") for i, n in enumerate(names))
    many = pd.Series([f"S{i}" for i in range(len(TOL_MUTED) + 1)] * 3)
    _fig, ax = new_figure(figsize=(4, 4))
    _scatter_by(ax, rng.normal(size=(len(many), 2)), many, "slide")
    assert ax.get_legend() is None and "10 slides\n(legend omitted)" in [t.get_text() for t in ax.texts]


def test_a_heatmap_of_a_wide_slide_a_long_class_and_a_predict_file(tmp_path, monkeypatch):
    """A 6:1 slide drew two panels an inch high side by side; a 31-character class ran over
    the colour bar; a predict file's heatmap said nothing of whether the slide was held out."""
    from simclr_path import figures
    from simclr_path.config import TileConfig
    from simclr_path.demo import make_demo_slide
    from simclr_path.store import PatchStore
    from simclr_path.tiling import tile_slide

    slide = make_demo_slide(tmp_path / "wide.tiff", seed=4, width=3072, height=512, mpp=0.5)
    tile_slide(slide, tmp_path / "wide.h5", TileConfig(mpp=1.0, patch_size=32), progress=False)
    c = PatchStore(tmp_path / "wide.h5").coords
    score = np.random.default_rng(0).uniform(0, 1, len(c))
    cls = "squamous_cell_carcinoma_keratin"
    pd.DataFrame({"slide_id": "wide", "level": "patch", "x": c[:, 0], "y": c[:, 1],
                  "score": score, f"prob_{cls}": score, "prob_other": 1 - score}).to_csv(
        tmp_path / "pred.csv", index=False)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    figures.plot_heatmap(tmp_path / "pred.csv", tmp_path / "wide.h5", tmp_path / "h.png")
    fig = drawn[0]
    img, heat = fig.axes[:2]
    assert heat.get_position().y1 < img.get_position().y0  # one above the other
    assert "scored by 'predict'" in img.get_title()
    bar = fig.axes[-1]
    assert bar.get_ylabel() == "P(squamous_\u2026ma_keratin)" and heat.get_title().startswith("P(squamous_cell_\u2026rcinoma_keratin) per patch")


def test_a_confusion_matrix_of_long_class_names_stays_readable(tmp_path, monkeypatch):
    """30-character class names took half of each panel; no panel said its n; white counts on
    cividis's mid grey were hard to read."""
    import json

    import matplotlib.colors as mcolors

    from simclr_path import figures

    classes = ["squamous_cell_carcinoma_keratinising", "adenocarcinoma_acinar_pattern"]
    cls = tmp_path / "cls"
    cls.mkdir()
    pd.DataFrame({"slide_id": ["a", "b"], "label": classes, "fold": 0,
                  **{f"prob_{c}": [0.5, 0.5] for c in classes}}).to_csv(
        cls / "predictions_patches.csv", index=False)
    pd.DataFrame({"slide_id": ["a", "b"], "label": classes,
                  **{f"prob_{c}": [0.5, 0.5] for c in classes}}).to_csv(
        cls / "predictions_slides.csv", index=False)
    cm = [[5, 5], [0, 10]]  # a 50 % cell
    (cls / "metrics.json").write_text(json.dumps({
        "task": {"classes": classes, "positive": None, "evaluation": "grouped_2fold"},
        "patch": {"confusion_matrix": cm}, "slide": {"confusion_matrix": cm}}))
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    figures.plot_confusion(cls, tmp_path / "c.png")
    ax = drawn[0].axes[0]
    assert all(len(t.get_text()) <= 22 for t in ax.get_xticklabels())
    assert ax.get_xticklabels()[0].get_text().startswith("squamous_")
    assert "n=20" in ax.get_title()
    half = next(t for t in ax.texts if t.get_text() == "5\n(50%)")
    assert mcolors.to_hex(half.get_color()) == "#000000"
    # a true class with no held-out slides (a sheet split's test side without it) is blank and
    # says so, where it was "0 (0%)" in the colour of every one missed (review)
    cm = [[5, 5], [0, 0]]
    (cls / "metrics.json").write_text(json.dumps({
        "task": {"classes": classes, "positive": None, "evaluation": "split"},
        "patch": {"confusion_matrix": cm}, "slide": {"confusion_matrix": cm}}))
    figures.plot_confusion(cls, tmp_path / "c2.png")
    ax = drawn[1].axes[1]
    assert [t.get_text() for t in ax.texts][2:] == ["0\n(no slides)"] * 2
    image = ax.get_images()[0].get_array()
    assert image.mask[1].all() and not image.mask[0].any()
    assert all(mcolors.to_hex(t.get_color()) == "#000000" for t in ax.texts[2:])


def test_the_tsne_title_says_what_it_is_a_sample_of(cohort, tmp_path, monkeypatch):
    """'t-SNE of 2000 patch embeddings' did not say of how many, nor from how many slides."""
    from simclr_path import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    figures.plot_tsne(cohort["embs"], tmp_path / "a.png", tmp_path / "b.png",
                      samples=cohort["sheet"], max_points=12)
    from simclr_path.store import EmbeddingStore

    total = sum(len(EmbeddingStore(p, features=False)) for p in cohort["embs"])
    title = drawn[0].axes[0].get_title()
    assert f"t-SNE of 12 of {total} patch embeddings ({len(cohort['embs'])} slides)" in title


def test_the_patch_thumbnail_map_shows_patches_large_enough_to_read(cohort, tmp_path,
                                                                    monkeypatch):
    """32 x 32 cells of 40 px in an 8-inch figure left about 22 screen pixels a patch."""
    from simclr_path import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    figures.plot_tsne(cohort["embs"], tmp_path / "a.png", tmp_path / "b.png",
                      samples=cohort["sheet"], stores=cohort["stores"],
                      out_thumbnails=tmp_path / "t.png")
    fig = drawn[2]
    fig.canvas.draw()  # the layout places the axes
    ax = fig.axes[0]
    canvas = ax.get_images()[0].get_array()
    screen_px = ax.get_window_extent().width  # at the figure's dpi
    assert canvas.shape[0] == 24 * 64 and screen_px / 24 >= 45, screen_px / 24


def test_tsne_with_a_damaged_store_writes_no_map(cohort, tmp_path, capsys, monkeypatch):
    """The label and slide maps were saved before the thumbnail map read a damaged patch, so a
    failed run left two figures that looked complete (review)."""
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import PatchStore

    def damaged(self, index):  # as PatchStore says of a chunk that fails its filter
        raise SimclrPathError(f"{self.path}: patch(es) {index} cannot be read: the file is "
                              "damaged; make it again")

    monkeypatch.setattr(PatchStore, "__getitem__", damaged)
    outs = tmp_path / "out"
    outs.mkdir()
    assert main(_tsne_argv(cohort, outs, cohort["stores"])) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the file is damaged" in err[0], err
    assert not any(outs.iterdir())
