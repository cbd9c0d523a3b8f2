from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import LC25000, needs

from simclr_path.classify import (
    LinearModel,
    classification_metrics,
    classify,
    find_positive,
    fit_probe,
    inner_splits,
    load_table,
    make_folds,
    positive_index,
    predict,
    predict_table,
    warn_grid_edge,
)
from simclr_path.cli import main
from simclr_path.config import ClassifyConfig
from simclr_path.errors import SimclrPathError
from simclr_path.store import EmbeddingStore, write_embeddings

FAST = ClassifyConfig(bootstrap=100, c_grid=[0.01, 1.0])


def make_cohort(
    folder, n_patients=10, patches=60, shift=1.0, dim=8, seed=0, two_slides=True, sha="enc1",
    image_size=None, tta=None, layer="pooled", extra=None,
):
    """Slides of SCC and normal patients; feature 0 is shifted by ``shift`` in SCC patches, so the
    Bayes patch-level AUROC is Phi(shift / sqrt(2))."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for p in range(n_patients):
        labels = ["SCC", "normal"] if two_slides else [["SCC", "normal"][p % 2]]
        for j, lab in enumerate(labels):
            sid = f"P{p}-S{j}"
            X = rng.normal(size=(patches, dim)).astype(np.float32)
            X[:, 0] += shift * (lab == "SCC")
            coords = np.stack([np.arange(patches) * 64, np.zeros(patches, dtype=np.int64)], axis=1)
            write_embeddings(
                folder / f"{sid}.h5",
                X,
                coords,
                {"slide_id": sid, "encoder_sha256": sha, "layer": layer, **(extra or {})}
                | ({} if image_size is None else {"image_size": image_size})
                | ({} if tta is None else {"tta": tta}),
            )
            paths.append(folder / f"{sid}.h5")
            rows.append(
                {"slide_id": sid, "path": f"{sid}.svs", "label": lab, "patient_id": f"P{p}"}
            )
    sheet = folder / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return paths, sheet


def test_known_signal_gives_expected_auroc(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=12, patches=100, shift=1.0)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    expected = 0.5 * (1 + math.erf(1.0 / math.sqrt(2) / math.sqrt(2)))  # Phi(1/sqrt(2)) = 0.760
    assert abs(m["patch"]["auroc"] - expected) < 0.04
    # averaging 100 patches per slide separates the slides completely
    assert m["slide"]["auroc"] == 1.0 and m["slide"]["balanced_accuracy"] == 1.0
    # every patient resample of perfectly separated slides scores 1: a "1.000-1.000" CI would
    # claim no uncertainty with 6 patients per class (review); none, with the reason
    assert m["slide"]["auroc_ci95"] is None
    assert "perfectly separated" in m["slide"]["auroc_ci95_note"]
    for key in (
        "auroc",
        "average_precision",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "f1",
    ):
        assert key in m["patch"] and key in m["slide"]
        assert m["fold_summary"]["slide"][key]["n_folds"] == 5
    assert np.asarray(m["slide"]["confusion_matrix"]).sum() == 24
    assert m["task"]["evaluation"] == "grouped_5fold" and m["task"]["positive"] == "SCC"
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [
        "metrics.json",
        "model.json",
        "model.npz",
        "predictions_patches.csv",
        "predictions_slides.csv",
    ]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["slide"]["auroc"] == 1.0


def test_few_patients_per_class_give_no_ci_and_say_why(tmp_path, capsys):
    # 3 patients per class, perfectly separated: every resample would give "1.000-1.000"
    paths, sheet = make_cohort(tmp_path / "c", n_patients=3, patches=40, shift=4.0)
    code = main(["classify", "--embeddings", *map(str, paths), "--samples", str(sheet), "--out",
                 str(tmp_path / "out"), "--folds", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "95% CI" not in out
    assert "CI not shown: 3 patients per class" in out
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["slide"]["auroc"] == 1.0
    assert m["slide"]["auroc_ci95"] is None  # the key stays, with the reason beside it
    assert m["slide"]["auroc_ci95_note"].startswith("CI not shown: 3 patients per class")
    # the t-SNE figure's keys are not the classifier's: they are not recorded as used
    assert "tsne_max_points" not in m["config"] and m["config"]["folds"] == 3


def test_enough_patients_give_a_ci_and_no_note(tmp_path):
    # a weak signal: slides not perfectly separated (where every resample gives AUROC 1)
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, shift=0.3)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert 0.5 < m["slide"]["auroc"] < 1.0
    assert len(m["slide"]["auroc_ci95"]) == 2 and m["slide"]["auroc_ci95_note"] is None
    off = classify(paths, tmp_path / "off", samples=sheet, cfg=replace(FAST, bootstrap=0))
    assert off["slide"]["auroc_ci95"] is None and "bootstrap is off" in off["slide"][
        "auroc_ci95_note"]


def test_no_signal_is_near_chance(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=12, patches=100, shift=0.0)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert abs(m["patch"]["auroc"] - 0.5) < 0.06


def test_no_patient_on_both_sides(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=9, patches=10, shift=1.0)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    patches = pd.read_csv(tmp_path / "out" / "predictions_patches.csv")
    assert (patches.groupby("patient_id")["fold"].nunique() == 1).all()
    assert (patches["fold"] >= 0).all() and patches["prob_SCC"].notna().all()
    # many random cohorts: every fold keeps whole patients on one side
    rng = np.random.default_rng(1)
    for seed in range(20):
        n = int(rng.integers(30, 60))
        slides = pd.DataFrame(
            {
                "slide_id": [f"s{i}" for i in range(n)],
                "patient_id": [f"p{x}" for x in rng.integers(0, n // 2, n)],
                "label": rng.choice(["SCC", "normal"], n),
            }
        )
        slides["y"] = (slides["label"] == "normal").astype(int)
        if (slides.groupby("label")["patient_id"].nunique() < 2).any():
            continue
        fold, _ = make_folds(slides, ["SCC", "normal"], ClassifyConfig(seed=seed))
        assert (pd.Series(fold).groupby(slides["patient_id"]).nunique() == 1).all()


def test_label_fraction_trains_on_fewer_patients(tmp_path, capsys):
    """A label fraction keeps that share of each class's training patients per fold (at least
    one), the same ones for the same seed; every slide is still tested."""
    from dataclasses import replace

    from simclr_path.classify import label_subset

    paths, sheet = make_cohort(tmp_path / "c", n_patients=20, patches=20, two_slides=False)
    cfg = replace(FAST, folds=2, label_fraction=0.2)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=cfg)
    t = load_table(paths, sheet, cfg)
    fold, _ = make_folds(t.slides, t.classes, cfg)
    for f in m["folds"]:  # 10 training patients (5 per class) per fold: 1 of each class kept
        train = t.slides[fold != f["fold"]]
        kept = label_subset(train, t.classes, 0.2, cfg.seed, f["fold"])
        assert f["labelled_patients"] == sorted(kept) and f["n_train_patients"] == len(kept) == 2
        assert f["labelled_patients_per_class"] == {"SCC": 1, "normal": 1}
        assert set(kept) <= set(train["patient_id"])
        assert f["n_train_patches"] == 2 * 20
    assert m["task"]["label_fraction"] == 0.2 and m["config"]["label_fraction"] == 0.2
    assert m["final_model"]["n_labelled_patients"] == 4  # round(0.2 * 10) per class
    assert m["task"]["n_evaluated_slides"] == 20
    assert len(pd.read_csv(tmp_path / "out" / "predictions_slides.csv")) == 20
    assert json.loads((tmp_path / "out" / "model.json").read_text())["n_train_patients"] == 4
    # all labels: no patient lists, every training patient used
    full = classify(paths, tmp_path / "all", samples=sheet, cfg=replace(cfg, label_fraction=1.0))
    for f in full["folds"]:
        assert "labelled_patients" not in f and f["n_labelled_patients"] == f["n_train_patients"] == 10
    # the CLI flag
    code = main(["classify", "--embeddings", *map(str, paths), "--samples", str(sheet), "--out",
                 str(tmp_path / "cli"), "--folds", "2", "--label-fraction", "0.2"])
    assert code == 0 and "at label fraction 0.2" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert [f["labelled_patients"] for f in saved["folds"]] == [f["labelled_patients"] for f in m["folds"]]


def test_split_column(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=8, patches=20, shift=2.0)
    df = pd.read_csv(sheet, sep="\t")
    df["split"] = ["test" if int(p[1:]) >= 6 else "train" for p in df["patient_id"]]
    df.to_csv(sheet, sep="\t", index=False)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert m["task"]["evaluation"] == "split" and m["slide"]["n"] == 4
    # the n beside a split's slide AUROC: its 2 test patients, not the sheet's 8 (review)
    assert m["task"]["n_patients"] == 8 and m["task"]["n_evaluated_patients"] == 2
    # folds set on purpose (the CLI's --folds) are not used with a split: said, not silent
    with pytest.warns(UserWarning, match="classify.folds 3 is not used: the samples sheet's "
                                         "split column chooses the test slides"):
        classify(paths, tmp_path / "out1", samples=sheet, cfg=replace(FAST, folds=3))
    df.loc[0, "split"] = "test"  # P0 now has one slide in test and one in train
    df.to_csv(sheet, sep="\t", index=False)
    with pytest.raises(SimclrPathError, match="patient 'P0' has slides in both train and test"):
        classify(paths, tmp_path / "out2", samples=sheet, cfg=FAST)
    assert not (tmp_path / "out2").exists()
    # only the training slides' stores given: nothing to test on, so no metrics at all
    df["split"] = ["test" if int(p[1:]) >= 6 else "train" for p in df["patient_id"]]
    df.to_csv(sheet, sep="\t", index=False)
    train_only = [p for p, pid in zip(paths, df["patient_id"]) if int(pid[1:]) < 6]
    with pytest.raises(SimclrPathError, match="none of the slides with patches is a test slide"):
        classify(train_only, tmp_path / "out3", samples=sheet, cfg=FAST)
    assert not (tmp_path / "out3").exists()


def test_a_split_names_a_patient_on_both_sides_before_too_few_patients(tmp_path):
    """P0, the only patient with normal slides, on both sides: the error said 'only 1 patient'
    and not the leak to fix."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=5, two_slides=False)
    df = pd.read_csv(sheet, sep="\t")
    df = df[df["label"] == "SCC"].copy()  # P0, P2
    df["split"] = ["train", "test"]
    extra = pd.DataFrame([{"slide_id": "P1-S0", "path": "P1-S0.svs", "label": "normal",
                           "patient_id": "P1", "split": "train"},
                          {"slide_id": "P3-S0", "path": "P3-S0.svs", "label": "normal",
                           "patient_id": "P1", "split": "test"}])
    pd.concat([df, extra]).to_csv(sheet, sep="\t", index=False)
    with pytest.raises(SimclrPathError, match="patient 'P1' has slides in both train and test"):
        classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    # a class's only patient on the test side: too few patients, not "move it to train" (which
    # then stopped on too few patients)
    extra = extra.iloc[:1].assign(split="test")
    pd.concat([df, extra]).to_csv(sheet, sep="\t", index=False)
    with pytest.raises(SimclrPathError, match="class 'normal' has slides from only 1 patient"):
        classify([q for q in paths if "P3" not in q.name], tmp_path / "out", samples=sheet,
                 cfg=FAST)


def test_a_split_whose_test_slides_hold_one_class_says_so(tmp_path):
    """It ran without a word, and the CI note blamed too few patients ('0 patients in class
    normal ... needs at least 5') for a test set without that class."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=12, patches=10, two_slides=False)
    df = pd.read_csv(sheet, sep="\t")
    df["split"] = ["test" if p in ("P6", "P8") else "train" for p in df["patient_id"]]  # SCC
    df.to_csv(sheet, sep="\t", index=False)
    with pytest.warns(UserWarning, match="no test slide of class 'normal', so the test set's "
                                         "AUROC and balanced accuracy are undefined"):
        m = classify(paths, tmp_path / "out", samples=sheet, cfg=replace(FAST, bootstrap=20))
    assert m["slide"]["auroc"] is None
    assert m["slide"]["auroc_ci95_note"] == ("CI not shown: the held-out slides hold no class "
                                             "'normal'")


def test_predict_after_reload_equals_in_memory(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=30, shift=1.0)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    t = load_table(paths, sheet, FAST)
    pipe, c, _ = fit_probe(t.X, t.y, t.patient, t.classes, FAST)  # the final model, refitted in memory
    assert json.loads((tmp_path / "out" / "model.json").read_text())["C"] == c
    out = predict(tmp_path / "out", paths[:2], tmp_path / "pred.csv")
    df = pd.read_csv(out)
    pr = df[df["level"] == "patch"]
    ref = pipe.predict_proba(np.concatenate([EmbeddingStore(p).features for p in paths[:2]]))
    np.testing.assert_allclose(
        pr[["prob_SCC", "prob_normal"]].to_numpy(), ref, atol=1e-6
    )  # sklearn computes in float32
    np.testing.assert_allclose(pr["score"], ref[:, 0], atol=1e-6)
    sl = df[df["level"] == "slide"]
    assert list(sl["slide_id"]) == ["P0-S0", "P0-S1"] and list(sl["n_patches"]) == [30, 30]
    np.testing.assert_allclose(sl["score"].iloc[0], ref[:30, 0].mean(), atol=1e-6)
    np.testing.assert_allclose(
        sl["score_topk"].iloc[0], np.sort(ref[:30, 0])[::-1][: FAST.top_k].mean(), atol=1e-6
    )
    m = LinearModel.load(tmp_path / "out")
    np.testing.assert_allclose(m.predict_proba(t.X[:5]), pipe.predict_proba(t.X[:5]), atol=1e-6)
    # far-out features give 0 and 1 without numpy's overflow warning on stderr
    far = np.zeros((2, t.X.shape[1]))
    far[:, 0] = [-1e6, 1e6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = m.predict_proba(far)
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1) and set(p.ravel().round()) == {0.0, 1.0}


def test_embedding_sizes_must_match(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, image_size=128)
    old, _ = make_cohort(tmp_path / "old", n_patients=6, patches=20, image_size=96)
    with pytest.raises(SimclrPathError, match="image_size 96 differs"):
        classify([*paths[:-1], old[-1]], tmp_path / "mix", samples=sheet, cfg=FAST)
    tta, _ = make_cohort(tmp_path / "tta", n_patients=6, patches=20, image_size=128, tta=True)
    with pytest.raises(SimclrPathError, match="tta True differs"):
        classify([*paths[:-1], tta[-1]], tmp_path / "mix", samples=sheet, cfg=FAST)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert json.loads((tmp_path / "out" / "model.json").read_text())["image_size"] == 128
    # scores of embeddings at another size or TTA setting would look complete and be wrong
    with pytest.raises(SimclrPathError, match="embedded at 96 px .* --image-size 128"):
        predict(tmp_path / "out", old[:1], tmp_path / "pred.csv")
    with pytest.raises(SimclrPathError, match="tta True .* embed with --no-tta"):
        predict(tmp_path / "out", tta[:1], tmp_path / "pred2.csv")
    assert not (tmp_path / "pred.csv").exists() and not (tmp_path / "pred2.csv").exists()


def test_predict_refuses_embeddings_of_another_layer_encoder_or_arch(tmp_path):
    extra = {"arch": "test_vit", "encoder": "runs/a/encoder.pt"}
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, image_size=32,
                               extra=extra)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["layer"] == "pooled" and meta["encoder"] == "runs/a/encoder.pt"
    cases = {  # same feature size every time: only the recorded metadata tells them apart
        "stage": ({"layer": "stage5", "extra": extra},
                  "layer 'stage5' .* layer 'pooled'; embed with --layer pooled"),
        "enc": ({"sha": "enc2", "extra": extra},
                (r"encoder sha256 enc2\.\.\. .* encoder enc1\.\.\.; embed with the encoder "
                 r"the classifier was trained on \(runs/a/encoder\.pt\)")),
        "arch": ({"extra": {**extra, "arch": "resnet18"}}, "a resnet18 encoder .* test_vit"),
    }
    for name, (kw, msg) in cases.items():
        other, _ = make_cohort(tmp_path / name, n_patients=1, patches=5, image_size=32, **kw)
        with pytest.raises(SimclrPathError, match=msg):
            predict(tmp_path / "out", other[:1], tmp_path / f"{name}.csv")
        assert not (tmp_path / f"{name}.csv").exists()
    # a file that records no encoder hash or layer (embed records both): its vectors' meaning
    # cannot be checked, and it was scored as if it matched
    import h5py

    for key in ("encoder_sha256", "layer"):
        other, _ = make_cohort(tmp_path / f"no-{key}", n_patients=1, patches=5, image_size=32,
                               extra=extra)
        with h5py.File(other[0], "a") as f:
            del f.attrs[key]
        with pytest.raises(SimclrPathError, match=f"records no {key}, so it cannot be shown"):
            predict(tmp_path / "out", other[:1], tmp_path / f"no-{key}.csv")
    # a model saved before layer/arch/tta were recorded: those comparisons are skipped
    del meta["layer"], meta["arch"], meta["tta"]
    (tmp_path / "out" / "model.json").write_text(json.dumps(meta))
    other, _ = make_cohort(tmp_path / "old", n_patients=1, patches=5, image_size=32,
                           layer="stage5", extra=extra)
    predict(tmp_path / "out", other[:1], tmp_path / "old.csv")
    assert (tmp_path / "old.csv").is_file()


def test_predict_accepts_another_input_size_at_the_same_tissue_scale(tmp_path):
    def one_file(name, image_size, patch_size, mpp):
        """One slide's embeddings of ``patch_size`` px patches at ``mpp`` embedded at ``image_size``."""
        paths, _ = make_cohort(tmp_path / name, n_patients=1, patches=5, image_size=image_size,
                               extra={"patch_size": patch_size, "mpp": mpp})
        return paths[:1]

    # 64 px patches at 0.5 um/px embedded at 32 px: 1 um per input pixel
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, image_size=32,
                               extra={"patch_size": 64, "mpp": 0.5})
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert json.loads((tmp_path / "out" / "model.json").read_text())["input_mpp"] == 1.0
    # 128 px patches at 0.5 um/px: embed scaled its input to 64 px, the same tissue scale
    predict(tmp_path / "out", one_file("s", 64, 128, 0.5), tmp_path / "same.csv")
    # 64 px patches at 64 px: twice the magnification the classifier was trained on
    with pytest.raises(SimclrPathError, match="embedded at 64 px.* --image-size 32"):
        predict(tmp_path / "out", one_file("z", 64, 64, 0.5), tmp_path / "zoom.csv")
    # embed's rounding to 8 px alone: 96 px patches at 0.25 um/px -> 24 px (exactly 1 um/px
    # would need 24; 20 px, off by one rounding step at this size, is still the same scale)
    predict(tmp_path / "out", one_file("r", 20, 96, 0.25), tmp_path / "rounded.csv")
    # another field of view at the wrong size: the refusal names the size that fits (24 px)
    with pytest.raises(SimclrPathError, match="0.75 um of tissue per input pixel, but .* 1 um per pixel .* --image-size 24"):
        predict(tmp_path / "out", one_file("w", 32, 96, 0.25), tmp_path / "wrong.csv")


def _damage(folder, json_fn=None, **arrays):
    """Rewrite a classifier folder: model.json through ``json_fn``, arrays replaced."""
    if json_fn is not None:
        info = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps(json_fn(info)))
    if arrays:
        with np.load(folder / "model.npz") as a:
            d = {k: a[k] for k in a.files}
        np.savez(folder / "model.npz", **{**d, **arrays})


@pytest.mark.parametrize(
    "json_fn, arrays, msg",
    [
        (lambda i: [i], {}, "a JSON list, not an object"),
        (lambda i: {**i, "format_version": 7}, {}, "newer than this simclr-path reads"),
        (lambda i: {k: v for k, v in i.items() if k != "format_version"}, {},
         "format_version None"),
        (lambda i: {**i, "kind": "random_forest"}, {}, "kind 'random_forest'"),
        (lambda i: {k: v for k, v in i.items() if k != "classes"}, {}, "'classes' must list"),
        (lambda i: {**i, "classes": ["a", "b", "c"], "positive": "a"}, {},
         r"coef has shape \(1, 8\), expected \(3, D\) for 3 classes"),
        (lambda i: {**i, "positive": "LUAD"}, {}, "positive class 'LUAD' is not one of"),
        (lambda i: {**i, "top_k": "ten"}, {}, "top_k 'ten'"),
        # the scale predict checks new files against (a traceback there; security review)
        (lambda i: {**i, "image_size": "abc"}, {}, "image_size 'abc' is not a whole number"),
        (lambda i: {**i, "image_size": [1]}, {}, r"image_size \[1\] is not a whole number"),
        (lambda i: {**i, "input_mpp": "fast"}, {}, "input_mpp 'fast' is not a positive"),
        (None, {"mean": np.zeros(5)}, r"mean has shape \(5,\), expected \(8,\)"),
        (None, {"scale": np.zeros(8)}, "scale holds values <= 0"),
        (None, {"coef": np.full((1, 8), np.nan)}, "coef holds NaN"),
        (None, {"intercept": np.zeros(2)}, r"intercept has shape \(2,\)"),
    ],
)
def test_a_damaged_classifier_is_one_clear_error(tmp_path, capsys, json_fn, arrays, msg):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=10)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    _damage(tmp_path / "out", json_fn, **arrays)
    rc = main(["predict", "--model", str(tmp_path / "out"), "--embeddings", str(paths[0]),
               "--out", str(tmp_path / "p.csv")])
    line = _one_error_line(capsys)
    assert rc != 0 and str(tmp_path / "out" / "model.") in line
    assert __import__("re").search(msg, line), line
    assert not (tmp_path / "p.csv").exists()


def test_multiclass_from_embedding_labels(tmp_path):
    rng = np.random.default_rng(0)
    names = ["lung_aca", "lung_n", "lung_scc"]
    groups, labels = [], []
    for g in range(18):
        groups += [f"g{g}"] * 8
        labels += [g % 3] * 8
    labels = np.array(labels)
    X = rng.normal(size=(len(labels), 6)).astype(np.float32)
    X[np.arange(len(labels)), labels] += 2.5
    write_embeddings(
        tmp_path / "lc.h5",
        X,
        -np.ones((len(labels), 2)),
        {"slide_id": "lc", "store_kind": "patches"},
        labels=labels,
        groups=groups,
        label_names=names,
    )
    m = classify([tmp_path / "lc.h5"], tmp_path / "out", cfg=ClassifyConfig(bootstrap=50))
    assert m["task"]["classes"] == names and m["task"]["positive"] == "lung_scc"
    assert m["task"]["n_slides"] == 18 and m["task"]["n_patients"] == 18
    assert np.asarray(m["patch"]["confusion_matrix"]).shape == (3, 3)
    assert (
        m["slide"]["balanced_accuracy"] > 0.9
        and m["patch"]["auroc"] > 0.9
        and m["patch"]["auroc_macro"] > 0.9
    )
    slides = pd.read_csv(tmp_path / "out" / "predictions_slides.csv")
    assert len(slides) == 18 and {"prob_lung_scc", "score", "score_topk"} <= set(slides.columns)
    # a mistyped positive label is an error, not the macro AUROC under the same key; null asks
    # for the macro scores
    with pytest.raises(SimclrPathError, match=r"positive_label 'tumor' is not one of the classes "
                       r"of the embedding files \(lung_aca, lung_n, lung_scc\).*or to null"):
        classify([tmp_path / "lc.h5"], tmp_path / "typo", cfg=ClassifyConfig(positive_label="tumor"))
    assert not (tmp_path / "typo").exists()
    m = classify([tmp_path / "lc.h5"], tmp_path / "macro",
                 cfg=ClassifyConfig(positive_label=None, bootstrap=0))
    assert m["task"]["positive"] is None and m["patch"]["auroc"] == m["patch"]["auroc_macro"]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_cli(tmp_path, capsys):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=10)
    out = tmp_path / "out"
    # fewer than two patients per class
    few, few_sheet = make_cohort(tmp_path / "few", n_patients=3, patches=10, two_slides=False)
    assert (
        main(
            [
                "classify",
                "--embeddings",
                *map(str, few),
                "--samples",
                str(few_sheet),
                "--out",
                str(out),
            ]
        )
        != 0
    )
    line = _one_error_line(capsys)
    assert "class 'normal' has slides from only 1 patient" in line and "never on both sides" in line
    assert not out.exists()
    # an embedding file whose slide is not in the sheet
    write_embeddings(
        tmp_path / "stray.h5",
        np.zeros((3, 8)),
        np.arange(6).reshape(3, 2),
        {"slide_id": "stray", "encoder_sha256": "enc1", "layer": "pooled"},
    )
    assert (
        main(
            [
                "classify",
                "--embeddings",
                *map(str, paths),
                str(tmp_path / "stray.h5"),
                "--samples",
                str(sheet),
                "--out",
                str(out),
            ]
        )
        != 0
    )
    assert "slide 'stray', which is not in the samples sheet" in _one_error_line(capsys)
    assert not out.exists()
    # a sheet error
    bad = tmp_path / "bad.tsv"
    bad.write_text("slide_id\tpath\tlabel\n")
    assert (
        main(
            ["classify", "--embeddings", *map(str, paths), "--samples", str(bad), "--out", str(out)]
        )
        != 0
    )
    assert "missing column(s) patient_id" in _one_error_line(capsys)
    # no labels anywhere
    assert main(["classify", "--embeddings", *map(str, paths), "--out", str(out)]) != 0
    assert "pass --samples" in _one_error_line(capsys)
    assert not out.exists()
    # a good run, then predict with embeddings of another size
    assert (
        main(
            [
                "classify",
                "--embeddings",
                *map(str, paths),
                "--samples",
                str(sheet),
                "--out",
                str(out),
                "--folds",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert json.loads((out / "metrics.json").read_text())["task"]["n_folds"] == 2
    assert (
        main(
            [
                "classify",
                "--embeddings",
                *map(str, paths),
                "--samples",
                str(sheet),
                "--out",
                str(out),
            ]
        )
        != 0
    )
    assert "already exists" in _one_error_line(capsys)
    write_embeddings(
        tmp_path / "wide.h5", np.zeros((3, 16)), np.zeros((3, 2)), {"slide_id": "wide"}
    )
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--embeddings",
                str(tmp_path / "wide.h5"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        != 0
    )
    line = _one_error_line(capsys)
    assert "16 dimensions but the classifier" in line and "expects 8" in line
    assert not (tmp_path / "p.csv").exists()
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--embeddings",
                str(paths[0]),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    # mixing encoders
    other, _ = make_cohort(tmp_path / "other", n_patients=2, patches=5, sha="enc2")
    assert (
        main(
            [
                "classify",
                "--embeddings",
                str(paths[0]),
                str(other[0]),
                "--samples",
                str(sheet),
                "--out",
                str(tmp_path / "mix"),
            ]
        )
        != 0
    )
    assert "encoder_sha256" in _one_error_line(capsys)


def _lc25000_subset_store(tmp_path, per_class_groups=6, per_group=3, size=32):
    """A small store from lc25000-dev: ``import_patches`` on a linked subset."""
    from simclr_path.import_patches import import_patches

    df = pd.read_csv(LC25000 / "groups.csv")
    picked = []
    for _, d in df.groupby("label"):
        for g in sorted(d["group"].unique())[:per_class_groups]:
            picked.append(d[d["group"] == g].head(per_group))
    sub = pd.concat(picked)
    out = tmp_path / "lc.h5"
    root = tmp_path / "lc"
    for rel in sub["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(LC25000 / rel)
    sub.to_csv(root / "groups.csv", index=False)
    import_patches(root, out, patch_size=size, groups_csv=root / "groups.csv")
    return out


@needs(LC25000)
def test_lc25000_imported_store_end_to_end(tmp_path):
    import torch

    from simclr_path.config import EmbedConfig
    from simclr_path.embed import embed_store
    from simclr_path.model import create_backbone, save_encoder

    store = _lc25000_subset_store(tmp_path)
    torch.manual_seed(0)
    save_encoder(create_backbone("resnet18"), tmp_path / "encoder.pt", "resnet18", image_size=32)
    emb = embed_store(
        tmp_path / "encoder.pt",
        store,
        tmp_path / "lc_emb.h5",
        EmbedConfig(workers=0),
        progress=False,
    )
    m = classify([emb], tmp_path / "out", cfg=ClassifyConfig(bootstrap=50, c_grid=[0.1, 1.0]))
    assert m["task"]["classes"] == ["lung_aca", "lung_n", "lung_scc"]
    assert m["task"]["positive"] == "lung_scc" and m["task"]["n_patients"] == 18
    for level in ("patch", "slide"):
        assert 0.0 <= m[level]["auroc"] <= 1.0 and 0.0 <= m[level]["balanced_accuracy"] <= 1.0
    # even a random encoder separates these classes better than chance (colour and texture differ)
    assert m["slide"]["auroc"] > 0.6
    patches = pd.read_csv(tmp_path / "out" / "predictions_patches.csv")
    assert (patches.groupby("patient_id")["fold"].nunique() == 1).all()


@pytest.mark.parametrize("edges, side", [(["below"] * 4 + [None], "below"),
                                         (["above", "above", None, "below"], "above")])
def test_a_c_grid_end_that_wins_in_half_the_fits_warns(edges, side):
    with pytest.warns(UserWarning, match=f"classify.c_grid: C=.* scored best in .* lie {side} it"):
        warn_grid_edge([1e-3, 1e-2, 1e-1, 1.0, 10.0], edges)


def test_rare_or_no_edge_wins_do_not_warn(recwarn):
    warn_grid_edge([1e-3, 1e-2, 1e-1, 1.0, 10.0], [None, "below", None, None, "above"])
    warn_grid_edge([1.0], [None, None])  # a fixed C is the user's choice
    assert not [w for w in recwarn if "c_grid" in str(w.message)]


def test_fit_probe_flags_a_winning_grid_end_but_not_a_tie():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 10)
    y = groups % 2
    cfg = ClassifyConfig(c_grid=[1e-4, 1e-3, 1e-2], inner_folds=3)
    # noisy, weakly informative features in many dimensions: strong regularisation scores best
    X = rng.normal(0, 1, (120, 300)) + 0.25 * y[:, None] * (rng.random(300) < 0.05)
    assert fit_probe(X, y, groups, ["a", "b"], cfg)[1:] == (
        1e-4, {"C_chosen_by": "inner_cv", "inner_folds": 3, "C_grid_end": "below"})
    # perfectly separable: every C scores 1.0, the tie goes to the first and says nothing
    X = np.c_[y * 10.0, rng.normal(0, 1, (120, 3))]
    assert fit_probe(X, y, groups, ["a", "b"], cfg)[1:] == (
        1e-4, {"C_chosen_by": "inner_cv", "inner_folds": 3, "C_grid_end": None})


def test_metrics_say_whether_c_was_chosen_by_inner_cv_or_fixed(tmp_path):
    """A fold with too few patients per class for inner CV used the grid's middle C with a
    warning on stderr only: metrics.json gave that C as if it had been chosen."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=8, patches=10)
    m = classify(paths, tmp_path / "a", samples=sheet, cfg=replace(FAST, folds=2))
    assert all(f["C_chosen_by"] == "inner_cv" and f["inner_folds"] >= 2 for f in m["folds"])
    assert m["final_model"]["C_chosen_by"] == "inner_cv"
    paths, sheet = make_cohort(tmp_path / "d", n_patients=2, patches=10)
    with pytest.warns(UserWarning, match="too few patients per class"):
        m = classify(paths, tmp_path / "b", samples=sheet, cfg=replace(FAST, folds=2))
    assert all(f["C_chosen_by"].startswith("fixed: too few patients per class (1)")
               and f["inner_folds"] == 0 for f in m["folds"])
    m = classify(paths, tmp_path / "e", samples=sheet, cfg=replace(FAST, c_grid=[0.5]))
    assert [f["C_chosen_by"] for f in m["folds"]] == ["the grid's one value"] * 2
    assert m["final_model"]["C"] == 0.5


def test_groups_of_several_classes_warn_that_they_count_as_their_majority(tmp_path):
    rng = np.random.default_rng(0)
    groups = [f"g{g}" for g in range(12) for _ in range(6)]
    labels = np.array([g % 2 for g in range(12) for _ in range(6)])
    labels[:2] = 1 - labels[:2]  # group g0 holds 2 patches of the other class
    X = rng.normal(size=(len(labels), 4)).astype(np.float32)
    write_embeddings(tmp_path / "p.h5", X, -np.ones((len(labels), 2)),
                     {"slide_id": "p", "store_kind": "patches"}, labels=labels, groups=groups,
                     label_names=["normal", "SCC"])
    with pytest.warns(UserWarning, match=r"1 group\(s\) hold patches of several classes .*'g0'"):
        classify([tmp_path / "p.h5"], tmp_path / "out", cfg=ClassifyConfig(bootstrap=0))


def test_a_class_that_no_group_is_the_majority_of_says_so(tmp_path):
    """Groups of three classes in equal parts count as the first class: the second had 5
    groups of patches and was told it had 'slides from only 0 patient(s); add more patients'."""
    groups = [f"p{g}" for g in range(5) for _ in range(6)]
    labels = np.array([0, 0, 1, 1, 2, 2] * 5)
    X = np.random.default_rng(0).normal(size=(len(labels), 4)).astype(np.float32)
    write_embeddings(tmp_path / "p.h5", X, -np.ones((len(labels), 2)),
                     {"slide_id": "p", "store_kind": "patches"}, labels=labels, groups=groups,
                     label_names=["aca", "n", "scc"])
    with pytest.warns(UserWarning, match="several classes"), pytest.raises(
            SimclrPathError, match=r"class 'n': 5 groups hold its patches, but it is the majority "
                                   r"class of only 0 \(a group of several classes"):
        classify([tmp_path / "p.h5"], tmp_path / "out", cfg=ClassifyConfig(bootstrap=0))
    assert not (tmp_path / "out").exists()


def test_patch_rows_name_their_file_so_patch_sets_sharing_group_names_trace_back(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):  # two imported patch sets whose groups carry the same names
        groups = [f"g{g}" for g in range(8) for _ in range(5)]
        labels = np.array([g % 2 for g in range(8) for _ in range(5)])
        X = rng.normal(size=(len(labels), 4)).astype(np.float32)
        X[:, 0] += 2.0 * labels
        coords = np.c_[np.arange(len(labels)) * 7 + 1000 * k, np.zeros(len(labels))]
        paths.append(write_embeddings(
            tmp_path / f"set{k}.h5", X, coords, {"slide_id": f"set{k}", "store_kind": "patches"},
            labels=labels, groups=groups, label_names=["normal", "SCC"]))
    # shared names are one source image: right for one image over two folders, but the same
    # set imported twice counted its tiles twice in silence
    with pytest.warns(UserWarning, match=r"set1.h5 and .*set0.h5 share group 'g0' \(and maybe "
                                         r"others\): their tiles count as one source image"):
        classify(paths, tmp_path / "out", cfg=ClassifyConfig(bootstrap=0, c_grid=[1.0], folds=4))
    pp = pd.read_csv(tmp_path / "out" / "predictions_patches.csv")
    assert sorted(pp["file"].unique()) == sorted(str(p) for p in paths)
    for f, rows in pp.groupby("file"):  # (file, patch_index) finds the patch's own row
        s = EmbeddingStore(f)
        assert (s.coords[rows["patch_index"], 0] == rows["x"]).all()
    df = predict_table(tmp_path / "out", paths[1:])
    assert (df["file"] == str(paths[1])).all()
    with pytest.warns(UserWarning, match="share group 'g0'"):
        predict_table(tmp_path / "out", paths)


def test_two_ungrouped_tile_sets_of_one_name_are_refused_not_merged(tmp_path, capsys):
    """Tiles of a set without groups are named SET:i; a/tiles.h5 and b/tiles.h5 (the import
    names a set by its file stem) made tile i of each one "slide" (80 tiles scored as 40
    slides; one class per file stopped with a false 'class has 0 patients') (review)."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        (tmp_path / f"d{k}").mkdir()
        labels = np.arange(40) % 2
        X = rng.normal(size=(40, 4)).astype(np.float32)
        X[:, 0] += 2.0 * labels
        paths.append(write_embeddings(
            tmp_path / f"d{k}" / "tiles.h5", X, -np.ones((40, 2), np.int64),
            {"slide_id": "tiles", "store_kind": "patches"}, labels=labels,
            label_names=["normal", "SCC"]))
    with pytest.raises(SimclrPathError, match=r"d1/tiles.h5: tile set 'tiles' was already given "
                                              r"in .*d0/tiles.h5; without groups"):
        classify(paths, tmp_path / "out", cfg=ClassifyConfig(bootstrap=0, c_grid=[1.0]))
    assert not (tmp_path / "out").exists()
    # one of them alone: each tile is its own unit
    with pytest.warns(UserWarning, match="no groups"):
        classify(paths[:1], tmp_path / "out", cfg=ClassifyConfig(bootstrap=0, c_grid=[1.0]))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["slide"]["n"] == 40


def test_tile_sets_whose_class_names_differ_only_in_case_are_refused(tmp_path):
    """Sets of classes scc/normal and SCC/normal trained three classes, the SCC tiles of one set
    counted as negatives of the other's 'scc' (slide AUROC 0.13) (review)."""
    paths = [_patch_set(tmp_path / "a.h5"), _patch_set(tmp_path / "b.h5", seed=1)]
    with h5py.File(paths[1], "r+") as f:
        f.attrs["slide_id"] = "set-b"
        f.attrs["label_names"] = ["scc", "normal"]
    with pytest.raises(SimclrPathError, match=r"b.h5: class 'scc' differs from class 'SCC' of "
                                              r".*a.h5 only in case"):
        classify(paths, tmp_path / "out", cfg=replace(FAST, bootstrap=0))


def test_inner_folds_hold_every_class_when_patch_counts_differ_widely():
    """StratifiedGroupKFold balances patch counts: with 3 SCC patients of 20/3000/500 patches and
    3 normal ones of 5/20/3000 it made single-class inner folds, every C scored NaN and the
    grid's first entry won (C depended on the grid's order)."""
    from sklearn.model_selection import StratifiedGroupKFold

    sizes = [20, 3000, 500, 5, 20, 3000]
    y = np.concatenate([np.full(n, int(i >= 3)) for i, n in enumerate(sizes)])
    g = np.concatenate([np.full(n, f"p{i}", dtype=object) for i, n in enumerate(sizes)])
    X = np.random.default_rng(0).normal(size=(len(y), 4))
    X[:, 0] += 2.0 * (y == 0)
    splits = inner_splits(y, g, 2, 3, seed=0)
    assert len(splits) == 3
    for tr, te in splits:
        assert set(y[te]) == {0, 1} and not set(g[tr]) & set(g[te])
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    c_up = fit_probe(X, y, g, ["SCC", "normal"], ClassifyConfig(c_grid=grid))[1]
    c_down = fit_probe(X, y, g, ["SCC", "normal"], ClassifyConfig(c_grid=grid[::-1]))[1]
    assert c_up == c_down
    # where sklearn's folds each hold every class, they are used unchanged
    y2, g2 = np.repeat([0, 1], 60), np.repeat(np.arange(12), 10)
    want = list(StratifiedGroupKFold(3, shuffle=True, random_state=4).split(y2, y2, g2))
    got = inner_splits(y2, g2, 2, 3, seed=4)
    assert all((a[1] == b[1]).all() for a, b in zip(want, got)) and len(got) == 3


def test_features_near_float32s_limit_are_refused_before_sklearn_overflows(tmp_path, recwarn):
    """Finite features of 3e38 passed the finite check, then sklearn's float32 sums overflowed:
    ~300 lines of RuntimeWarnings and NaN inner-CV scores, and results were still written."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=10, shift=1.0)
    e = EmbeddingStore(paths[1])
    x = e.features.copy()
    x[:, 1] = 3e38
    write_embeddings(paths[1], x, e.coords, e.attrs, force=True)
    with pytest.raises(SimclrPathError, match=rf"{paths[1]}: 10 patch row\(s\) hold NaN, "
                                              r"infinite or implausibly large"):
        classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert not (tmp_path / "out").exists()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_nan_features_are_refused_with_the_file_and_row(tmp_path, capsys):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=10, shift=1.0)
    classify(paths, tmp_path / "model", samples=sheet, cfg=FAST)
    e = EmbeddingStore(paths[2])
    x = e.features.copy()
    x[3, 1] = np.nan
    write_embeddings(paths[2], x, e.coords, e.attrs, force=True)
    want = (rf"{paths[2]}: 1 patch row\(s\) hold NaN, infinite or implausibly large \(above "
            rf"1e\+12\) features \(first: row 3\)")
    with pytest.raises(SimclrPathError, match=want):
        classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    with pytest.raises(SimclrPathError, match=want):  # argmax of NaN would say the first class
        predict(tmp_path / "model", [paths[2]], tmp_path / "p.csv")
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.csv").exists()
    assert main(["predict", "--model", str(tmp_path / "model"), "--embeddings", str(paths[2]),
                 "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "NaN, infinite" in err and "Traceback" not in err


def test_one_class_and_classes_without_files_are_named(tmp_path):
    rng = np.random.default_rng(0)
    write_embeddings(tmp_path / "one.h5", rng.normal(size=(20, 4)), -np.ones((20, 2)),
                     {"slide_id": "one", "store_kind": "patches"}, labels=np.zeros(20, int),
                     groups=[f"g{i // 4}" for i in range(20)], label_names=["SCC"])
    with pytest.raises(SimclrPathError, match=r"only one class \('SCC'\) in the embedding files"):
        classify([tmp_path / "one.h5"], tmp_path / "o1", cfg=FAST)
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=10, two_slides=False)
    normal_only = [p for p in paths if int(p.stem[1]) % 2]  # the sheet's SCC files left out
    with pytest.raises(SimclrPathError, match=r"lists slides of class 'SCC' \(e.g. 'P0-S0'\) "
                                              r"but none of the embedding files given"):
        classify(normal_only, tmp_path / "o2", samples=sheet, cfg=FAST)
    for p in paths:  # the SCC slides given, but without patches (no tissue found)
        if int(p.stem[1]) % 2 == 0:
            write_embeddings(p, np.zeros((0, 8)), np.zeros((0, 2)), EmbeddingStore(p).attrs,
                             force=True)
    with pytest.warns(UserWarning, match="has no patches"), pytest.raises(
            SimclrPathError, match=r"every embedding file given of class 'SCC' has no patches"):
        classify(paths, tmp_path / "o3", samples=sheet, cfg=FAST)


def test_an_imported_patch_set_given_twice_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    groups = [f"g{g}" for g in range(8) for _ in range(5)]
    labels = np.array([g % 2 for g in range(8) for _ in range(5)])
    write_embeddings(tmp_path / "p.h5", rng.normal(size=(40, 4)), -np.ones((40, 2)),
                     {"slide_id": "p", "store_kind": "patches"}, labels=labels, groups=groups,
                     label_names=["normal", "SCC"])
    with pytest.raises(SimclrPathError, match="p.h5: given twice; pass each embedding file once"):
        classify([tmp_path / "p.h5", tmp_path / "p.h5"], tmp_path / "o", cfg=FAST)


def test_too_few_patients_for_inner_cv_uses_the_middle_of_an_unsorted_grid():
    groups = np.repeat(np.arange(3), 5)  # class 1 has one patient: no inner folds
    y = groups % 2
    X = np.random.default_rng(0).normal(size=(15, 3))
    cfg = ClassifyConfig(c_grid=[10.0, 1e-3, 1.0], inner_folds=3)
    with pytest.warns(UserWarning, match="using C=1.0"):
        assert fit_probe(X, y, groups, ["a", "b"], cfg)[1] == 1.0


def _scaled(folder, patch_size, mpp, image_size, **kw):
    """A cohort of 6 patients whose files record ``patch_size`` px patches at ``mpp`` embedded
    at ``image_size`` px (``patch_size * mpp / image_size`` um of tissue per input pixel)."""
    return make_cohort(folder, n_patients=6, patches=10, image_size=image_size,
                       extra={"patch_size": patch_size, "mpp": mpp}, **kw)


def test_classify_refuses_files_at_another_tissue_scale_and_names_them(tmp_path, capsys):
    paths, sheet = _scaled(tmp_path / "c", 64, 1.0, 64)  # 1 um per input pixel
    odd, _ = _scaled(tmp_path / "odd", 64, 0.5, 64)  # tiled at 0.5 um/px, same 64 px: 0.5 um
    mixed = [odd[0], *paths[1:]]  # the odd one first: the reference is the majority, not it
    with pytest.raises(SimclrPathError, match=(
            rf"^{odd[0]}: embedded at 64 px, 0.5 um of tissue per input pixel, but "
            rf"{paths[1]} and 10 other file\(s\) at 1 um per pixel \(64 px\); one classifier "
            r"needs one tissue scale: embed it with --image-size 32,")):
        classify(mixed, tmp_path / "out", samples=sheet, cfg=FAST)
    assert not (tmp_path / "out").exists()
    # two odd files: the first named, the others counted
    rc = main(["classify", "--embeddings", *map(str, [*paths[:-2], *odd[-2:]]), "--samples",
               str(sheet), "--out", str(tmp_path / "out")])
    line = _one_error_line(capsys)
    assert rc != 0 and line.endswith(f"1 more file(s) differ too ({odd[-1]})"), line
    assert not (tmp_path / "out").exists()
    # one scale: model.json records it, so predict checks it
    classify(paths, tmp_path / "ok", samples=sheet, cfg=FAST)
    assert json.loads((tmp_path / "ok" / "model.json").read_text())["input_mpp"] == 1.0
    with pytest.raises(SimclrPathError, match="0.5 um of tissue per input pixel, but the "
                       r"classifier .* 1 um per pixel .* --image-size 32"):
        predict(tmp_path / "ok", odd[:1], tmp_path / "p.csv")
    # a coarser tiling than the classifier's scale: more pixels than the patches hold would be
    # an upsampled blur, which the hint (--image-size 128 for 64 px patches) asked for
    coarse, _ = _scaled(tmp_path / "coarse", 64, 2.0, 64)
    with pytest.raises(SimclrPathError, match=r"2 um of tissue per input pixel, .* its 64 px "
                       r"patches at 2 um/px have fewer pixels than that scale needs \(128 px\): "
                       r"tile the slide at --mpp 1 or finer, then embed it without --image-size$"):
        predict(tmp_path / "ok", coarse[:1], tmp_path / "p.csv")


def test_classify_accepts_other_image_sizes_at_one_tissue_scale(tmp_path):
    # 96 px patches at 0.5 um/px embedded at 64 px: 0.75 um per input pixel; embed gives 128 px
    # patches of the same slides' scale 88 px (85.3 exactly, rounded to a multiple of 8)
    paths, sheet = _scaled(tmp_path / "c", 96, 0.5, 64)
    big, _ = _scaled(tmp_path / "big", 128, 0.5, 88)
    m = classify([*paths[:-2], *big[-2:]], tmp_path / "out", samples=sheet, cfg=FAST)
    assert m["task"]["n_slides"] == 12
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["input_mpp"] == 0.75 and meta["image_size"] == 64
    predict(tmp_path / "out", big[:1], tmp_path / "p.csv")  # the same scale: scored
    # the 128 px patches at 64 px are at 1 um per pixel: refused, naming the size that fits
    wrong, _ = _scaled(tmp_path / "w", 128, 0.5, 64)
    with pytest.raises(SimclrPathError, match=r"^.*P5-S1.h5: embedded at 64 px, 1 um of tissue .*"
                       r"at 0.75 um per pixel \(64 px\); .* --image-size 85, the size that shows "
                       "its 128 px patches at 0.75 um per pixel$"):
        classify([*paths[:-1], wrong[-1]], tmp_path / "out2", samples=sheet, cfg=FAST)
    # files that do not record their scale must share the pixel size
    bare, _ = make_cohort(tmp_path / "bare", n_patients=6, patches=10, image_size=88)
    with pytest.raises(SimclrPathError, match="image_size 88 differs .* not every file records"):
        classify([*paths[:-1], bare[-1]], tmp_path / "out3", samples=sheet, cfg=FAST)


def test_predict_advice_for_a_classifier_without_a_tissue_scale(tmp_path):
    # a classifier trained on files without mpp: a file at another size may be at another scale
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=10, image_size=64)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    assert json.loads((tmp_path / "out" / "model.json").read_text())["input_mpp"] is None
    other, _ = _scaled(tmp_path / "o", 128, 0.5, 88)
    with pytest.raises(SimclrPathError, match=(
            "embedded at 88 px but .* 64 px embeddings and the classifier .* does not record the "
            "tissue scale .* --image-size 64 if its patches have the training stores' patch size "
            "and mpp, else leave --image-size out")):
        predict(tmp_path / "out", other[:1], tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_predict_refuses_a_slide_given_twice(tmp_path, capsys):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=10)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    rc = main(["predict", "--model", str(tmp_path / "out"), "--embeddings", str(paths[0]),
               str(paths[1]), str(paths[0]), "--out", str(tmp_path / "p.csv")])
    line = _one_error_line(capsys)
    assert rc != 0 and line.endswith(
        f"{paths[0]}: slide 'P0-S0' was already given in {paths[0]}; pass each slide's "
        "embedding file once"), line
    assert not (tmp_path / "p.csv").exists()
    # another file of the same slide id too (its rows would share the slide_id)
    copy = tmp_path / "copy.h5"
    copy.write_bytes(paths[1].read_bytes())
    with pytest.raises(SimclrPathError, match="slide 'P0-S1' was already given"):
        predict(tmp_path / "out", [paths[1], copy], tmp_path / "p.csv")
    predict(tmp_path / "out", paths[:2], tmp_path / "p.csv")
    assert pd.read_csv(tmp_path / "p.csv").query("level == 'slide'")["slide_id"].tolist() == [
        "P0-S0", "P0-S1"]


def test_an_empty_file_is_not_reported_as_missing(tmp_path, recwarn):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=10)
    write_embeddings(tmp_path / "E0.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2)),
                     {"slide_id": "E0", "encoder_sha256": "enc1", "layer": "pooled"})
    df = pd.read_csv(sheet, sep="\t")
    df.loc[len(df)] = ["E0", "E0.svs", "SCC", "P9"]
    df.to_csv(sheet, sep="\t", index=False)
    classify([*paths, tmp_path / "E0.h5"], tmp_path / "out", samples=sheet, cfg=FAST)
    msgs = [str(w.message) for w in recwarn]
    assert any("slide 'E0' has no patches; it is left out" in m for m in msgs), msgs
    assert not any("have no embedding file" in m for m in msgs), msgs
    # a sheet slide without any file still says so
    recwarn.clear()
    classify(paths[1:], tmp_path / "out2", samples=sheet, cfg=FAST)
    msgs = [str(w.message) for w in recwarn]
    assert any("2 slide(s) of the samples sheet have no embedding file and are left out "
               "(first: E0)" in m for m in msgs), msgs


def _mixed_cohort(folder, rows):
    rng = np.random.default_rng(0)
    paths = []
    for sid, _, lab in rows:
        X = rng.normal(size=(10, 4)).astype(np.float32) + (lab == "SCC")
        write_embeddings(folder / f"{sid}.h5", X, np.arange(20).reshape(10, 2), {"slide_id": sid})
        paths.append(str(folder / f"{sid}.h5"))
    sheet = folder / "s.tsv"
    pd.DataFrame(rows, columns=["slide_id", "patient_id", "label"]).assign(path="x.svs").to_csv(
        sheet, sep="\t", index=False)
    return paths, sheet


def test_folds_are_found_for_patients_with_slides_of_both_labels(tmp_path, capsys):
    """P1 has a normal and an SCC slide: {P1} | {P2, P3} is a valid patient-grouped split,
    which the stratified splitter never drew (for any seed); it was refused."""
    rows = [("A", "P1", "normal"), ("B", "P1", "SCC"), ("C", "P2", "SCC"), ("D", "P3", "normal")]
    paths, sheet = _mixed_cohort(tmp_path, rows)
    slides = pd.DataFrame(rows, columns=["slide_id", "patient_id", "label"])
    slides["y"] = (slides["label"] == "normal").astype(int)
    for seed in range(5):
        fold, scheme = make_folds(slides, ["SCC", "normal"], replace(FAST, seed=seed))
        assert scheme == "grouped_2fold" and fold[0] == fold[1] != fold[2] == fold[3]
    again, _ = make_folds(slides, ["SCC", "normal"], FAST)
    assert (again == make_folds(slides, ["SCC", "normal"], FAST)[0]).all()  # deterministic
    rc = main(["classify", "--embeddings", *paths, "--samples", str(sheet), "--out",
               str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    # where no split exists (three classes, each pair of them shares a patient, two folds: each
    # side needs all three), the reason names the shared patients, in one line
    rows = [("A", "P1", "SCC"), ("B", "P1", "normal"), ("C", "P2", "SCC"), ("D", "P2", "other"),
            ("E", "P3", "normal"), ("F", "P3", "other")]
    (tmp_path / "none").mkdir()
    paths, sheet = _mixed_cohort(tmp_path / "none", rows)
    (tmp_path / "three.yaml").write_text("classify: {labels: [SCC, normal, other]}\n")
    capsys.readouterr()
    rc = main(["classify", "--embeddings", *paths, "--samples", str(sheet), "--out",
               str(tmp_path / "out2"), "--config", str(tmp_path / "three.yaml")])
    line = _one_error_line(capsys)
    assert rc != 0 and "class index" not in line, line
    assert __import__("re").search(
        r"without a training slide of class '(SCC|normal|other)': its slides come from only 2 "
        r"patient\(s\) \('P[12]', 'P[23]'\), and patient\(s\) 'P[12]', 'P[23]' also have slides of "
        r"another label.*add patients with '(SCC|normal|other)' slides", line), line
    assert not (tmp_path / "out2").exists()


def test_fit_probe_names_a_missing_class():
    X = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(SimclrPathError, match="no patches of class 'normal'; add patients"):
        fit_probe(X, np.zeros(6, int), np.arange(6), ["SCC", "normal"], FAST)


def test_a_misspelled_split_column_stops_classify(tmp_path, capsys):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=4, patches=10)
    df = pd.read_csv(sheet, sep="\t")
    df["spilt"] = ["test" if p == "P3" else "train" for p in df["patient_id"]]
    df.to_csv(sheet, sep="\t", index=False)
    rc = main(["classify", "--embeddings", *map(str, paths), "--samples", str(sheet), "--out",
               str(tmp_path / "out")])
    line = _one_error_line(capsys)
    assert rc != 0 and "column 'spilt' is not a known column: did you mean 'split'?" in line
    assert not (tmp_path / "out").exists()
    df.rename(columns={"spilt": "split"}).to_csv(sheet, sep="\t", index=False)
    assert classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)["task"][
        "evaluation"] == "split"


def test_the_python_api_takes_one_path_and_never_writes_over_its_inputs(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, shift=1.0)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    one = predict(tmp_path / "out", str(paths[0]), tmp_path / "one.csv")  # a str: one file
    assert set(pd.read_csv(one)["slide_id"]) == {"P0-S0"}
    before = paths[0].read_bytes()
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(embedding_paths\)"):
        predict(tmp_path / "out", paths[:2], paths[0], force=True)
    with pytest.raises(SimclrPathError, match="is inside the input folder"):
        predict(tmp_path / "out", paths[:2], tmp_path / "out" / "model.json", force=True)
    with pytest.raises(SimclrPathError, match=r"inside its out_dir folder"):
        classify(paths, tmp_path / "c", samples=sheet, cfg=FAST, force=True)
    assert paths[0].read_bytes() == before and (tmp_path / "out" / "model.json").is_file()
    with pytest.raises(SimclrPathError, match="embedding_paths: expected a path or a list"):
        classify(3, tmp_path / "x", samples=sheet, cfg=FAST)


def test_predict_table_is_the_csv_in_memory(tmp_path):

    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, shift=1.0)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    before = sorted(tmp_path.rglob("*"))
    df = predict_table(tmp_path / "out", paths[:3])
    assert sorted(tmp_path.rglob("*")) == before  # in memory: nothing written
    csv = pd.read_csv(predict(tmp_path / "out", paths[:3], tmp_path / "p.csv"))
    assert list(df.columns) == list(csv.columns) and len(df) == len(csv) == 3 * 20 + 3
    pd.testing.assert_frame_equal(df.reset_index(drop=True), csv, check_dtype=False)


@pytest.mark.parametrize(
    ("classes", "label", "expected"),
    [
        (["lung_aca", "lung_n", "lung_scc"], "SCC", 2),
        (["LungSCC", "Normal"], "scc", 0),
        (["squamous_cell_carcinoma", "normal"], "squamous cell", 0),
        (["SCC", "normal"], "scc", 0),
        (["non_SCC", "LUAD"], "SCC", None),  # a negated name is the other class
        (["nonSCC", "SCC_tumour"], "SCC", 1),
        (["nonscc", "tumour"], "SCC", None),  # "scc" inside a word is not the word
        (["scc_1", "scc_2"], "SCC", None),  # two matches: ambiguous
    ],
)
def test_the_positive_class_is_a_whole_word_of_one_class_name(classes, label, expected):
    assert find_positive(classes, label) == expected


def test_a_negated_class_name_is_never_taken_as_the_positive_class():
    with pytest.raises(SimclrPathError, match=r"'SCC' is not one of the classes"):
        positive_index(["non_SCC", "LUAD"], "SCC")


def test_f1_is_undefined_not_zero_where_the_fold_lacks_a_class():
    # binary: a test fold of negatives only has no F1, as it has no sensitivity
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    m = classification_metrics(np.array([0, 0, 0]), proba, ["normal", "SCC"], positive=1)
    assert math.isnan(m["f1"]) and math.isnan(m["sensitivity"]) and m["specificity"] == 2 / 3
    m = classification_metrics(np.array([0, 1, 1]), proba, ["normal", "SCC"], positive=1)
    assert m["f1"] == pytest.approx(2 / 3)
    # three classes, one absent from y: no macro F1 (an absent class would count as 0)
    p3 = np.eye(3)[[0, 0, 1, 1]]
    m = classification_metrics(np.array([0, 0, 1, 1]), p3, ["A", "B", "C"], positive=None)
    assert math.isnan(m["balanced_accuracy"])  # the two present classes' recall, not C's too
    assert math.isnan(m["f1_macro"]) and math.isnan(m["f1"]) and math.isnan(m["auroc_macro"])
    m = classification_metrics(np.array([0, 1, 2]), np.eye(3), ["A", "B", "C"], positive=None)
    assert m["f1_macro"] == 1.0


def test_predict_on_empty_slides_alone_keeps_every_column_and_a_damaged_npz_is_one_line(
        tmp_path, capsys):
    """Only empty slides gave a CSV without score / score_topk (plot-heatmap then refused it);
    a truncated model.npz was a zipfile traceback."""
    import shutil

    paths, sheet = make_cohort(tmp_path / "c", n_patients=6, patches=20, shift=1.0)
    classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    full = predict_table(tmp_path / "out", paths[:1])
    empty = write_embeddings(tmp_path / "E.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2)),
                             EmbeddingStore(paths[0]).attrs | {"slide_id": "E"})
    with pytest.warns(UserWarning, match="has no patches"):
        alone = predict_table(tmp_path / "out", [empty])
    assert list(alone.columns) == list(full.columns)
    assert "score" in alone.columns and "score_topk" in alone.columns
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    data = (bad / "model.npz").read_bytes()
    (bad / "model.npz").write_bytes(data[: len(data) // 2])
    rc = main(["predict", "--model", str(bad), "--embeddings", str(paths[0]), "--out",
               str(tmp_path / "p.csv")])
    line = _one_error_line(capsys)
    assert rc == 2 and "model.npz" in line and "damaged" in line, line
    assert not (tmp_path / "p.csv").exists()
    # a pickle in its place: damaged, without numpy's advice to load it "unsafely" (review)
    (bad / "model.npz").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    rc = main(["predict", "--model", str(bad), "--embeddings", str(paths[0]), "--out",
               str(tmp_path / "p.csv")])
    line = _one_error_line(capsys)
    assert rc == 2 and "classifier files are damaged (it holds pickled (object) data, which is " \
        "never loaded)" in line, line
    assert "allow_pickle" not in line and "trust" not in line


def test_the_probe_of_each_fold_never_sees_its_test_patients(tmp_path, monkeypatch):
    """The rows each fold's probe is fitted on, not only the fold masks: a probe fitted on
    test rows as well passed every other test (toy features barely move the AUROC)."""
    import simclr_path.classify as C

    fitted, fit = [], C.fit_probe
    monkeypatch.setattr(C, "fit_probe", lambda X, y, groups, *a, **k: (
        fitted.append(set(groups)), fit(X, y, groups, *a, **k))[1])
    paths, sheet = make_cohort(tmp_path / "c", n_patients=10, patches=10, shift=1.0)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    patches = pd.read_csv(tmp_path / "out" / "predictions_patches.csv")
    everyone = set(patches["patient_id"])
    assert len(fitted) == len(m["folds"]) + 1  # one probe per fold, then the final model
    for f, groups in zip(m["folds"], fitted):
        test = set(patches.loc[patches["fold"] == f["fold"], "patient_id"])
        assert test and not groups & test and groups | test == everyone
    assert fitted[-1] == everyone


def _hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC (Hanley & McNeil 1982, Radiology 143:29)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2)
                      + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg))


def test_the_slide_auroc_ci_is_a_95_percent_patient_bootstrap():
    """Its width matches the AUROC's standard error (a 40-60 percentile interval or a 2.5-97.5
    one of another statistic would not), and it resamples patients: a patient's second slide,
    identical to the first, adds no information, so the interval does not narrow (resampling
    slides would treat the copies as independent and shrink it by about 1/sqrt(2))."""
    from sklearn.metrics import roc_auc_score

    from simclr_path.classify import auroc_ci

    rng = np.random.default_rng(0)
    n = 40  # patients per class
    y = np.repeat([0, 1], n)  # classes ["SCC", "normal"]: SCC = 0 is the positive
    score = rng.normal(size=2 * n) + 0.9 * (y == 0)
    proba = np.stack([score, -score], axis=1)
    one = pd.DataFrame({"slide_id": [f"s{i}" for i in range(2 * n)],
                        "patient_id": [f"p{i}" for i in range(2 * n)],
                        "label": np.where(y == 0, "SCC", "normal")})
    cfg = ClassifyConfig(bootstrap=2000)
    ci, note = auroc_ci(y, proba, one, ["SCC", "normal"], 0, cfg)
    auc = roc_auc_score(y == 0, score)
    expected = 2 * 1.96 * _hanley_mcneil_se(auc, n, n)
    assert note is None and ci[0] < auc < ci[1]
    assert 0.8 * expected < ci[1] - ci[0] < 1.25 * expected
    two = pd.concat([one, one.assign(slide_id=one["slide_id"] + "b")], ignore_index=True)
    ci2, _ = auroc_ci(np.tile(y, 2), np.tile(proba, (2, 1)), two, ["SCC", "normal"], 0, cfg)
    assert ci2 == pytest.approx(ci)


def test_the_top_k_slide_auroc_ranks_slides_by_their_top_k_score(tmp_path):
    from sklearn.metrics import roc_auc_score

    paths, sheet = make_cohort(tmp_path / "c", n_patients=12, patches=30, shift=0.4, seed=3)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    slides = pd.read_csv(tmp_path / "out" / "predictions_slides.csv")
    pos = slides["label"] == "SCC"
    assert m["slide"]["auroc_topk"] == pytest.approx(roc_auc_score(pos, slides["score_topk"]))
    assert m["slide"]["auroc"] == pytest.approx(roc_auc_score(pos, slides["score"]))
    assert m["slide"]["auroc_topk"] != pytest.approx(m["slide"]["auroc"])  # the test can tell


def _patch_set(path, groups_per_class=4, per_group=10, shift=2.0, seed=0):
    """An imported patch set's embeddings: SCC and normal source images (groups)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], groups_per_class * per_group)
    X = rng.normal(size=(len(y), 8)).astype(np.float32)
    X[:, 0] += shift * (y == 0)
    groups = [f"{'scc' if c == 0 else 'n'}-{(i % (groups_per_class * per_group)) // per_group}"
              for i, c in enumerate(y)]
    write_embeddings(path, X, -np.ones((len(y), 2), np.int64),
                     {"slide_id": "set", "store_kind": "patches", "encoder_sha256": "enc1",
                      "layer": "pooled"},
                     labels=y, groups=groups, label_names=["SCC", "normal"])
    return path


def test_predict_scores_each_group_of_a_patch_set_as_a_slide(tmp_path):
    """classify's unit for an imported set is the group; predict averaged the whole set (both
    classes) into one meaningless slide row."""
    train = _patch_set(tmp_path / "train.h5")
    classify([train], tmp_path / "out", cfg=replace(FAST, folds=2, bootstrap=0))
    new = _patch_set(tmp_path / "new.h5", groups_per_class=2, seed=1)
    df = predict_table(tmp_path / "out", [new])
    slides = df[df["level"] == "slide"].set_index("slide_id")
    assert sorted(slides.index) == ["n-0", "n-1", "scc-0", "scc-1"]
    assert (slides["n_patches"] == 10).all()
    assert (slides.loc[["scc-0", "scc-1"], "pred"] == "SCC").all()
    assert (slides.loc[["n-0", "n-1"], "pred"] == "normal").all()
    patches = df[df["level"] == "patch"]
    assert sorted(set(patches["slide_id"])) == sorted(slides.index)


def test_a_fold_of_one_class_has_no_balanced_accuracy():
    """Of one class, sklearn's balanced accuracy is that class's recall: another quantity,
    which fold means averaged in with the others."""
    m = classification_metrics(np.array([0, 0, 0]), np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]),
                               ["SCC", "normal"], 0)
    assert math.isnan(m["balanced_accuracy"]) and math.isnan(m["auroc"])
    both = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]),
                                  ["SCC", "normal"], 0)
    assert both["balanced_accuracy"] == 0.5


def test_label_fractions_round_half_up():
    from simclr_path.classify import pick_patients

    # the last three are halves in decimals but not in floats (0.29 x 50 = 14.4999...: kept 14)
    for n, fraction, kept in ((5, 0.5, 3), (7, 0.5, 4), (25, 0.1, 3), (35, 0.1, 4), (10, 0.2, 2),
                              (50, 0.29, 15), (90, 0.35, 32), (45, 0.7, 32)):
        slides = pd.DataFrame({"slide_id": [f"s{i}" for i in range(n)],
                               "patient_id": [f"p{i}" for i in range(n)], "label": "SCC"})
        got = pick_patients(slides, ["SCC"], fraction, np.random.default_rng(0))
        assert len(got) == kept, (n, fraction, len(got))


def test_with_a_split_the_saved_model_is_fitted_on_the_training_slides_only(tmp_path):
    """It was fitted on every slide, the test slides too: the model shipped was not the one
    evaluated, and predict on the test cohort scored slides it had trained on."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=8, patches=20, shift=2.0)
    df = pd.read_csv(sheet, sep="\t")
    df["split"] = ["test" if int(p[1:]) >= 6 else "train" for p in df["patient_id"]]
    df.to_csv(sheet, sep="\t", index=False)
    m = classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    model = json.loads((tmp_path / "out" / "model.json").read_text())
    assert model["n_train_slides"] == 12 and model["n_train_patients"] == 6
    assert m["final_model"]["n_labelled_patients"] == 6
    (fold,) = m["folds"]  # the one evaluated model: the same training patients
    assert fold["n_train_patients"] == 6 and fold["C"] == model["C"]
    # at a label fraction too (a refit drew its own patients), and it predicts as evaluated
    half = classify(paths, tmp_path / "half", samples=sheet,
                    cfg=replace(FAST, label_fraction=0.5))
    assert half["final_model"]["labelled_patients"] == half["folds"][0]["labelled_patients"]
    pp = pd.read_csv(tmp_path / "half" / "predictions_patches.csv")
    test = pp[pp["fold"] == 0]
    again = predict_table(tmp_path / "half", [p for p in paths if p.stem in set(test["slide_id"])])
    again = again[again["level"] == "patch"].set_index(["slide_id", "patch_index"])
    np.testing.assert_allclose(
        again.loc[list(zip(test["slide_id"], test["patch_index"])), "prob_SCC"].to_numpy(),
        test["prob_SCC"].to_numpy(), atol=1e-5)


def test_mixed_encoders_name_the_file_off_the_most_common_value(tmp_path):
    """With the first file the odd one, the error named a good file as the one to embed again."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=3, patches=5)
    odd, _ = make_cohort(tmp_path / "odd", n_patients=1, patches=5, sha="other")
    odd[0].replace(paths[0])  # the first slide's file, embedded with another encoder
    with pytest.raises(SimclrPathError) as err:
        classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    msg = str(err.value)
    assert msg.startswith(f"{paths[0]}: encoder_sha256 'other' differs from 5 of 6 files "
                          f"('enc1', e.g. {paths[1]})"), msg


def test_a_slide_file_with_repeated_patches_is_refused(tmp_path):
    """A file holding its patches twice was accepted: they counted twice in training, in the
    patch metrics and in the top-k score."""
    paths, sheet = make_cohort(tmp_path / "c", n_patients=3, patches=5)
    s = EmbeddingStore(paths[2])
    write_embeddings(paths[2], np.concatenate([s.features, s.features]),
                     np.concatenate([s.coords, s.coords]), s.attrs, force=True)
    with pytest.raises(SimclrPathError, match=r"P1-S0.h5: 5 patch row\(s\) repeat the "
                                              r"coordinates of another \(first: x=0, y=0\)"):
        classify(paths, tmp_path / "out", samples=sheet, cfg=FAST)
    classify(paths[:2] + paths[3:], tmp_path / "out", samples=sheet, cfg=FAST)
    with pytest.raises(SimclrPathError, match="repeat the coordinates"):
        predict(tmp_path / "out", paths[2:3], tmp_path / "p.csv")


def test_embeddings_of_a_fine_tuned_encoder_warn_and_are_recorded(tmp_path):
    paths, sheet = make_cohort(tmp_path / "c", n_patients=3, patches=5)
    m = classify(paths, tmp_path / "a", samples=sheet, cfg=FAST)
    assert m["task"]["encoder_fine_tuned_from"] is None
    paths, sheet = make_cohort(tmp_path / "t", n_patients=3, patches=5,
                               extra={"fine_tuned_from": "runs/a/encoder.pt"})
    with pytest.warns(UserWarning, match=r"embedded with an encoder fine-tuned with labels "
                                         r"\(from runs/a/encoder.pt\); any patient it was "
                                         "fine-tuned on makes this evaluation optimistic"):
        m = classify(paths, tmp_path / "b", samples=sheet, cfg=FAST)
    assert m["task"]["encoder_fine_tuned_from"] == "runs/a/encoder.pt"


def test_the_probe_scales_features_in_slices_with_sklearns_result(monkeypatch):
    """StandardScaler's one-pass fit copied float32 features to float64 (2x the training rows
    on top of them: +1.1 GB at 3e5 x 512); slices give the same mean and scale."""
    import tracemalloc

    from sklearn.preprocessing import StandardScaler

    from simclr_path.classify import _chunked_scaler, fit_probe

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((40_000, 64)) * rng.uniform(0.1, 5, 64) + 3).astype(np.float32)
    want = StandardScaler().fit(X)
    tracemalloc.start()
    got = _chunked_scaler().fit(X)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(got.mean_, want.mean_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.scale_, want.scale_, rtol=1e-10)
    assert got.n_samples_seen_ == len(X)
    assert peak < X.nbytes  # sklearn's own: 2x X.nbytes for the float64 copy
    y = (X[:, 0] > 3).astype(int)
    pipe, _, _ = fit_probe(X[:2000], y[:2000], np.arange(2000) % 50, ["a", "b"],
                           ClassifyConfig(c_grid=[1.0]))
    assert type(pipe.steps[0][1]).__name__ == "ChunkedStandardScaler"
    import pickle  # n_jobs or a saved pipeline pickle it: a class local to a function failed

    again = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(again.predict_proba(X[:50]), pipe.predict_proba(X[:50]))


def test_a_tile_sets_ci_note_speaks_of_source_images_not_patients(tmp_path):
    """The table, captions and band said "source image" for a tile set; the note said
    "3 patients per class (a patient bootstrap ...)" (review)."""
    m = classify([_patch_set(tmp_path / "p.h5", groups_per_class=3)], tmp_path / "out",
                 cfg=replace(FAST, folds=3))
    note = m["slide"]["auroc_ci95_note"]
    assert note == ("CI not shown: 3 source images per class (a source image bootstrap needs at "
                    "least 5 per class)"), note


def test_the_ci_note_counts_one_patient_in_the_singular():
    from simclr_path.classify import auroc_ci
    from simclr_path.config import ClassifyConfig

    slides = pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "label": ["a", "b", "b"]})
    y, p = np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9])
    ci, note = auroc_ci(y, p, slides, ["a", "b"], 1, ClassifyConfig())
    assert ci is None and note.startswith("CI not shown: 1 patient in class 'a' (a patient "), note
