"""Fine-tuning (``simclr-path finetune``): training, folds, label fractions, outputs, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import fake_mlflow

from simclr_path.classify import classify, label_subset, make_folds
from simclr_path.cli import main
from simclr_path.config import PipelineConfig, build_config
from simclr_path.embed import file_sha256
from simclr_path.errors import SimclrPathError
from simclr_path.finetune import (
    Augment,
    finetune,
    load_classifier,
    load_patch_table,
    validation_split,
)
from simclr_path.model import create_backbone, save_encoder
from simclr_path.store import PatchStoreWriter, write_embeddings

ARCH = "test_byobnet"  # a tiny timm model: tests stay fast on a busy CPU
SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spin-waits made these tiny
    trainings ~10x slower with two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(create_backbone(ARCH), path, ARCH, image_size=SIZE, mpp=0.5)
    return path


def _patches(rng, n: int, scc: bool) -> np.ndarray:
    """Noisy patches whose colour tells the class: pink-purple (SCC) vs pale pink (normal)."""
    base = np.array([150, 60, 160] if scc else [230, 180, 200], dtype=np.float64)
    x = base + rng.normal(0, 25, size=(n, SIZE, SIZE, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """8 patients, one slide each, 4 per class, 8 patches a slide; sheet + stores."""
    d = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows, paths = [], []
    for i in range(8):
        label = "SCC" if i % 2 == 0 else "normal"
        sid = f"S{i}"
        with PatchStoreWriter(d / f"{sid}.h5", patch_size=SIZE,
                              attrs={"slide_id": sid, "kind": "slide", "mpp": 0.5}) as w:
            coords = np.stack([np.arange(8) * SIZE, np.zeros(8, dtype=np.int64)], axis=1)
            w.append(_patches(rng, 8, label == "SCC"), coords)
        paths.append(d / f"{sid}.h5")
        rows.append({"slide_id": sid, "path": f"{sid}.svs", "label": label, "patient_id": f"P{i}"})
    sheet = d / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return paths, sheet


def tiny_cfg(**ft) -> PipelineConfig:
    over = {"epochs": 3, "patience": 5, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2,
            "device": "cpu", "amp": False, **ft}
    return build_config("default", {"finetune": over,
                                    "classify": {"folds": 2, "bootstrap": 20},
                                    "train": {"tensorboard": True}})


@pytest.fixture(scope="module")
def result(cohort, encoder, tmp_path_factory):
    paths, sheet = cohort
    out = tmp_path_factory.mktemp("ft") / "out"
    m = finetune(paths, encoder, out, samples=sheet, cfg=tiny_cfg(), progress=False)
    return m, out


def test_training_lowers_loss_and_writes_classify_layout(result, encoder):
    m, out = result
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "predictions_patches.csv", "predictions_slides.csv", "history.csv",
            "encoder.pt", "encoder.json", "classifier.pt", "tensorboard"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    hist = pd.read_csv(out / "history.csv")
    for _, h in hist.groupby("fold"):
        assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
        assert np.isfinite(h["train_loss"]).all() and h["best"].sum() == 1
        # the LR each epoch started at: the first is the configured one, the last not yet 0
        # (the LR after the epoch read 0 for the last one, which never trained at 0)
        assert h["lr"].iloc[0] in (1e-3, 1e-2) and (h["lr"] > 0).all()
        assert (np.diff(h["lr"].to_numpy()) < 0).all()
    assert set(hist["fold"]) == {"fold0", "fold1", "final"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == m  # what the API returns is what it wrote
    assert saved["task"]["evaluation"] == "grouped_2fold" and saved["task"]["positive"] == "SCC"
    # tied to the encoder's content, as classify's results are
    assert saved["task"]["encoder_sha256"] == file_sha256(encoder)
    for level in ("patch", "slide"):
        for key in ("auroc", "average_precision", "balanced_accuracy", "sensitivity",
                    "specificity", "f1"):
            v = saved[level][key]
            assert v is not None and 0.0 <= v <= 1.0 and math.isfinite(v), (level, key)
        assert saved["fold_summary"][level]["auroc"]["n_folds"] == 2
    assert np.asarray(saved["slide"]["confusion_matrix"]).sum() == 8
    assert saved["patch"]["auroc"] > 0.8  # colour separates the classes
    pp = pd.read_csv(out / "predictions_patches.csv")
    assert len(pp) == 64 and np.allclose(pp[["prob_SCC", "prob_normal"]].sum(axis=1), 1.0)
    assert len(pd.read_csv(out / "predictions_slides.csv")) == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"fold0/train_loss", "fold1/val_loss", "final/train_loss", "test/slide_auroc"} <= set(tags)
    model = load_classifier(out)
    assert model.head.out_features == 2
    # a folder without the final model says so (it said encoder.json was missing)
    (out.parent / "no-model").mkdir(exist_ok=True)
    with pytest.raises(SimclrPathError, match=r"no fine-tuned classifier here .*final_model: true"):
        load_classifier(out.parent / "no-model")
    # what it was fine-tuned on, so embed sizes its input for these patches
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["patch_size"] == SIZE and meta["image_size"] == SIZE


def test_plots_read_the_output(result, tmp_path):
    _, out = result
    assert main(["plot-curves", "--classify", str(out), "--out-roc", str(tmp_path / "roc.png"),
                 "--out-pr", str(tmp_path / "pr.png")]) == 0
    assert main(["plot-confusion", "--classify", str(out), "--out",
                 str(tmp_path / "cm.png")]) == 0
    assert (tmp_path / "roc.png").stat().st_size > 0 and (tmp_path / "cm.png").stat().st_size > 0


def test_folds_are_classifys_and_patient_disjoint(result, cohort):
    m, _ = result
    paths, sheet = cohort
    cfg = tiny_cfg()
    t, stores = load_patch_table(paths, sheet, cfg)
    fold, _ = make_folds(t.slides, t.classes, cfg.classify)  # what classify uses
    pred = pd.read_csv(result[1] / "predictions_slides.csv")
    assert dict(zip(pred["slide_id"], pred["fold"])) == dict(zip(t.slides["slide_id"], fold))
    for f in m["folds"]:
        test = set(t.slides.loc[fold == f["fold"], "patient_id"])
        assert f["n_test_patients"] == len(test) and f["n_train_patients"] + f["n_val_patients"] == 8 - len(test)
        assert f["early_stopping"] and f["n_val_patients"] >= 2
    for s in stores:
        s.close()


def test_label_fraction_keeps_patients_per_class():
    slides = pd.DataFrame({"patient_id": [f"P{i}" for i in range(30)],
                           "label": ["SCC"] * 20 + ["normal"] * 10})
    for frac, want in ((1.0, (20, 10)), (0.5, (10, 5)), (0.1, (2, 1)), (0.01, (1, 1))):
        kept = label_subset(slides, ["SCC", "normal"], frac, seed=3)
        got = tuple(slides[slides.patient_id.isin(kept)].groupby("label").size()[["SCC", "normal"]])
        assert got == want, frac
        assert kept == label_subset(slides, ["SCC", "normal"], frac, seed=3)  # deterministic
    assert label_subset(slides, ["SCC", "normal"], 0.1, 3) != label_subset(slides, ["SCC", "normal"], 0.1, 4)
    val = validation_split(slides, ["SCC", "normal"], 0.2, seed=0)
    assert len(val & set(slides.patient_id[:20])) == 4 and len(val & set(slides.patient_id[20:])) == 2
    one = slides.iloc[[0, 1, 20]]  # a single normal patient: nothing to hold out
    assert validation_split(one, ["SCC", "normal"], 0.2, seed=0) == set()


def test_probe_and_finetuning_get_the_same_labelled_patients(cohort, encoder, tmp_path):
    """At one label fraction, fold by fold (and for the final model), the linear probe and
    fine-tuning train on the same patients: one draw (classify.label_subset, classify.seed)."""
    paths, sheet = cohort
    rng = np.random.default_rng(5)
    emb = []
    for p in paths:  # embeddings of the same slides (the probe's input)
        sid = p.stem
        emb.append(write_embeddings(tmp_path / "emb" / f"{sid}.h5", rng.normal(size=(8, 4)),
                                    np.arange(16).reshape(8, 2),
                                    {"slide_id": sid, "layer": "pooled"}))
    for seed in (0, 7):  # classify.seed sets the folds and the draw; finetune.seed does not
        cfg = build_config("default", {
            "finetune": {"epochs": 1, "batch_size": 16, "device": "cpu", "amp": False,
                         "label_fraction": 0.5, "seed": 3},
            "classify": {"folds": 2, "bootstrap": 0, "c_grid": [1.0], "label_fraction": 0.5,
                         "seed": seed},
            "train": {"tensorboard": False}})
        ft = finetune(paths, encoder, tmp_path / f"ft{seed}", samples=sheet, cfg=cfg,
                      progress=False)
        probe = classify(emb, tmp_path / f"probe{seed}", samples=sheet, cfg=cfg.classify)
        assert [f["fold"] for f in ft["folds"]] == [f["fold"] for f in probe["folds"]] == [0, 1]
        for a, b in zip(ft["folds"], probe["folds"]):
            # 2 training patients per class per fold, half of them kept
            assert a["labelled_patients"] == b["labelled_patients"] and len(a["labelled_patients"]) == 2
            assert a["labelled_patients_per_class"] == b["labelled_patients_per_class"] == {
                "SCC": 1, "normal": 1}
            assert a["n_val_patients"] == 0 and b["n_train_patients"] == 2
        assert ft["final_model"]["labelled_patients"] == probe["final_model"]["labelled_patients"]
        assert len(ft["final_model"]["labelled_patients"]) == 4


def test_augment_shapes_and_determinism():
    import torch

    raw = torch.randint(0, 256, (5, 40, 40, 3), dtype=torch.uint8)
    aug = Augment(32, color_jitter=1.0)
    a = aug(raw, torch.Generator().manual_seed(1), torch.device("cpu"))
    b = aug(raw, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b) and torch.isfinite(a).all()


def test_imported_store_labels(encoder, tmp_path):
    rng = np.random.default_rng(1)
    n = 32
    labels = np.array([0, 1] * (n // 2))
    groups = [f"G{i % 8}" for i in range(n)]  # 8 groups, each single-class
    with PatchStoreWriter(tmp_path / "set.h5", patch_size=SIZE, attrs={"slide_id": "set", "kind": "patches"},
                          label_names=["lung_scc", "lung_n"]) as w:
        pats = np.concatenate([_patches(rng, 1, lab == 0) for lab in labels])
        w.append(pats, np.full((n, 2), -1), labels=labels, groups=groups)
    cfg = build_config("default", {"finetune": {"epochs": 1, "batch_size": 16, "device": "cpu",
                                                "final_model": False},
                                   "classify": {"folds": 2, "bootstrap": 0},
                                   "train": {"tensorboard": False}})
    m = finetune([tmp_path / "set.h5"], encoder, tmp_path / "o", cfg=cfg, progress=False)
    assert m["task"]["labels_from"] == "patch stores" and m["task"]["positive"] == "lung_scc"
    assert m["task"]["n_slides"] == 8 and not (tmp_path / "o" / "tensorboard").exists()


def test_bad_input_one_line_and_no_output(cohort, encoder, tmp_path, capsys):
    paths, sheet = cohort
    out = tmp_path / "o"
    small = tmp_path / "small.yaml"
    small.write_text("finetune: {image_size: 16}\n")
    cases = [
        ([str(paths[0]), "--encoder", str(tmp_path / "nope.pt")], "encoder file not found"),
        ([str(tmp_path / "missing.h5"), "--encoder", str(encoder)], "patch store not found"),
        ([*map(str, paths[:1]), "--encoder", str(encoder)], "lists slides of class 'normal'"),
        ([*map(str, paths), "--encoder", str(encoder), "--label-fraction", "0"],
         "finetune.label_fraction"),
        ([*map(str, paths), "--encoder", str(encoder), "--config", str(small)],
         "finetune.image_size is 16 px, smaller than test_byobnet's output stride (32 px)"),
    ]
    # a store tiled at another mpp: one input size would show its tissue at another scale
    other = tmp_path / "S7.h5"
    with PatchStoreWriter(other, patch_size=SIZE,
                          attrs={"slide_id": "S7", "kind": "slide", "mpp": 1.0}) as w:
        w.append(_patches(np.random.default_rng(1), 8, False),
                 np.stack([np.arange(8) * SIZE, np.zeros(8, dtype=np.int64)], axis=1))
    cases.append(([*map(str, paths[:7]), str(other), "--encoder", str(encoder)],
                  "S7.h5: patches at 1 um/px but"))
    for args, msg in cases:
        code = main(["finetune", *args, "--samples", str(sheet), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code != 0 and msg in err and len(err.splitlines()) == 1, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
    out.mkdir()
    with pytest.raises(SimclrPathError, match="already exists"):
        finetune(paths, encoder, out, samples=sheet, cfg=tiny_cfg())
    # force replaces the out folder whole: never one holding an input
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(encoder\) inside "
                                              "its out_dir folder"):
        finetune(paths, encoder, encoder.parent, samples=sheet, cfg=tiny_cfg(), force=True)
    assert encoder.is_file()
    # nor a folder of a copied encoder (encoder.pt made it count as finetune's, and --force
    # replaced the user's encoder with the fine-tuned one)
    mine = tmp_path / "models" / "mine"
    mine.mkdir(parents=True)
    for name in ("encoder.pt", "encoder.json"):
        (mine / name).write_bytes((encoder.parent / name).read_bytes())
    with pytest.raises(SimclrPathError, match="is not a results folder of this command"):
        finetune(paths, encoder, mine, samples=sheet, cfg=tiny_cfg(), force=True)
    assert (mine / "encoder.pt").read_bytes() == (encoder.parent / "encoder.pt").read_bytes()


def test_cli_one_percent_labels_trains_without_early_stopping(cohort, encoder, tmp_path, capsys):
    paths, sheet = cohort
    cfg = tmp_path / "c.yaml"
    cfg.write_text("finetune: {batch_size: 16, final_model: false, amp: false}\n"
                   "classify: {folds: 3, bootstrap: 0}\ntrain: {tensorboard: false}\n")
    with pytest.warns(UserWarning, match="without early stopping"):  # --folds over the config's
        code = main(["finetune", *map(str, paths), "--encoder", str(encoder), "--samples",
                     str(sheet), "--out", str(tmp_path / "o"), "--config", str(cfg), "--epochs",
                     "1", "--label-fraction", "0.01", "--device", "cpu", "--folds", "2"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "label fraction 0.01" in out and "CI not shown: the bootstrap is off" in out
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["config"]["finetune"]["epochs"] == 1 and m["task"]["label_fraction"] == 0.01
    # the classify keys it read and no others (the workflow's finetune YAML holds only these)
    from simclr_path.config import CLASSIFY_FINETUNE_KEYS

    assert set(m["config"]["classify"]) == set(CLASSIFY_FINETUNE_KEYS)
    assert m["config"]["classify"]["folds"] == 2
    for f in m["folds"]:  # 1% of 2 patients per class: still one per class
        assert f["n_labelled_patients"] == 2
        assert f["labelled_patients_per_class"] == {"SCC": 1, "normal": 1}
        assert f["n_val_patients"] == 0 and not f["early_stopping"]
    assert m["final_model"] is None and not (tmp_path / "o" / "encoder.pt").exists()


def test_a_workflow_rerun_finds_its_folder_after_snakemake_deleted_the_outputs(cohort, encoder,
                                                                                 tmp_path):
    """Snakemake deletes a rerun job's declared outputs; without a final model only
    tensorboard/ was left, and --force refused the folder as not a finetune results folder."""
    paths, sheet = cohort
    cfg = tiny_cfg(epochs=1, final_model=False)
    cfg.classify.bootstrap = 0
    out = tmp_path / "labels_1.0"
    finetune(paths, encoder, out, samples=sheet, cfg=cfg, progress=False)
    for name in ("metrics.json", "predictions_patches.csv", "predictions_slides.csv",
                 "history.csv"):
        (out / name).unlink()
    assert (out / "tensorboard").is_dir()
    finetune(paths, encoder, out, samples=sheet, cfg=cfg, force=True, progress=False)
    assert (out / "metrics.json").is_file()


def test_a_warning_names_the_folds_that_trained_without_early_stopping():
    """Only 'no fold at all' was warned about: some folds on fixed epochs passed in silence."""
    from simclr_path.finetune import _warn_fixed_epochs

    with pytest.warns(UserWarning, match=r"without early stopping in fold\(s\) 0, 1 of 3: .*"
                                         r"trained 7 epochs"):
        _warn_fixed_epochs([{"fold": 0, "early_stopping": False},
                            {"fold": 1, "early_stopping": False},
                            {"fold": 2, "early_stopping": True}], 7)
    with pytest.warns(UserWarning, match="without early stopping in every fold"):
        _warn_fixed_epochs([{"fold": 0, "early_stopping": False}], 7)
    with pytest.warns(UserWarning, match=r"without early stopping in the final model: .* it "
                                         r"trained 7 epochs"):
        _warn_fixed_epochs([{"fold": 0, "early_stopping": True}], 7, {"early_stopping": False})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_fixed_epochs([{"fold": 0, "early_stopping": True}], 7)
        _warn_fixed_epochs([{"fold": 0, "early_stopping": True}], 7, {"early_stopping": True})


def test_without_validation_only_the_kept_epoch_is_marked_best(cohort, encoder, tmp_path):
    paths, sheet = cohort
    cfg = tiny_cfg(epochs=2, final_model=True, label_fraction=0.01)
    cfg.classify.bootstrap = 0
    # the final model on fixed epochs was not named (only the folds were)
    with pytest.warns(UserWarning, match="without early stopping in every fold and the final "
                                         "model: .* they trained 2 epochs"):
        m = finetune(paths, encoder, tmp_path / "o", samples=sheet, cfg=cfg, progress=False)
    assert not m["final_model"]["early_stopping"]
    hist = pd.read_csv(tmp_path / "o" / "history.csv")
    assert set(hist["fold"]) == {"fold0", "fold1", "final"}
    for _, h in hist.groupby("fold"):  # no validation patients: the last epoch is kept
        assert h["best"].tolist() == [False, True]


def test_a_non_finite_training_loss_stops_with_one_line(cohort, encoder, tmp_path, monkeypatch):
    from simclr_path import finetune as ft_mod

    forward = ft_mod.FinetuneModel.forward

    def diverging(self, x):  # the training loss blows up at one step
        y = forward(self, x)
        return y * float("inf") if self.training else y

    monkeypatch.setattr(ft_mod.FinetuneModel, "forward", diverging)
    paths, sheet = cohort
    with pytest.raises(SimclrPathError, match=r"the fine-tuning loss became nan in epoch 1; "
                                              "lower finetune.lr"):
        finetune(paths, encoder, tmp_path / "o", samples=sheet, cfg=tiny_cfg(epochs=2),
                 progress=False)
    assert not (tmp_path / "o").exists()


def test_non_finite_predictions_stop_with_one_line(cohort, encoder, tmp_path, monkeypatch):
    import torch

    from simclr_path import finetune as ft_mod

    forward = ft_mod.FinetuneModel.forward

    def diverged(self, x):  # weights that blew up in the last step: NaN at evaluation only
        y = forward(self, x)
        return y if self.training else y * float("nan")

    monkeypatch.setattr(ft_mod.FinetuneModel, "forward", diverged)
    paths, sheet = cohort
    with pytest.raises(SimclrPathError, match="predicts non-finite probabilities; lower finetune.lr"):
        finetune(paths, encoder, tmp_path / "o", samples=sheet, cfg=tiny_cfg(epochs=1),
                 progress=False)
    assert not (tmp_path / "o").exists()
    assert torch.isfinite(forward(ft_mod.FinetuneModel(create_backbone(ARCH), 2).eval(),
                                  torch.zeros(1, 3, SIZE, SIZE))).all()


def test_an_empty_store_of_another_patch_size_is_left_out(cohort, tmp_path):
    paths, sheet = cohort
    # an encoder that records no image size, pretrained at another mpp than these stores
    enc = tmp_path / "enc" / "encoder.pt"
    enc.parent.mkdir()
    save_encoder(create_backbone(ARCH), enc, ARCH, mpp=0.25)
    with PatchStoreWriter(tmp_path / "E.h5", patch_size=2 * SIZE,
                          attrs={"slide_id": "E", "kind": "slide", "mpp": 1.0}):
        pass  # no tissue: no patches
    df = pd.read_csv(sheet, sep="\t")
    df.loc[len(df)] = {"slide_id": "E", "path": "E.svs", "label": "SCC", "patient_id": "P9"}
    df.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    m = finetune([tmp_path / "E.h5", *paths], enc, tmp_path / "o", samples=tmp_path / "s.tsv",
                 cfg=tiny_cfg(epochs=1), progress=False)
    # the size of the patches it trained on, not of the empty store listed first
    assert m["task"]["image_size"] == SIZE and m["task"]["n_slides"] == 8
    meta = json.loads((tmp_path / "o" / "encoder.json").read_text())
    assert (meta["mpp"], meta["patch_size"], meta["image_size"]) == (0.5, SIZE, SIZE)


def test_a_diverged_validation_epoch_keeps_the_earlier_one(cohort, encoder, tmp_path, monkeypatch):
    from simclr_path import finetune as ft_mod

    predict, calls = ft_mod._Run.predict, []

    def second_epoch_diverges(self, model, rows, name="fine-tuning"):
        out = predict(self, model, rows, name)
        if name is None:  # validation: epochs 2, 4, ... of the run come out as NaN
            calls.append(1)
            if len(calls) % 2 == 0:
                out = out * np.nan
        return out

    monkeypatch.setattr(ft_mod._Run, "predict", second_epoch_diverges)
    paths, sheet = cohort
    finetune(paths, encoder, tmp_path / "o", samples=sheet,
             cfg=tiny_cfg(epochs=2, final_model=False), progress=False)
    hist = pd.read_csv(tmp_path / "o" / "history.csv")
    assert len(calls) == 4  # two folds, two epochs, each with validation patients
    for _, h in hist.groupby("fold"):
        assert h["best"].tolist() == [True, False] and np.isnan(h["val_loss"].iloc[1])


def test_default_image_size_is_the_probes(cohort, tmp_path):
    # the probe embeds whole patches at fixres_size of the encoder's training size, not at the
    # training size: fine-tuning must see the tissue at that scale too, for a fair comparison
    from simclr_path.embed import default_image_size
    from simclr_path.model import encoder_info
    from simclr_path.store import PatchStore

    paths, sheet = cohort
    enc = tmp_path / "enc" / "encoder.pt"
    enc.parent.mkdir()
    save_encoder(create_backbone(ARCH), enc, ARCH, image_size=24, crop_scale=[0.2, 1.0], mpp=0.5)
    with PatchStore(paths[0]) as s:
        probe = default_image_size(encoder_info(enc), s)
    assert probe == SIZE  # 24 px / E[sqrt(crop)] = 32 px
    m = finetune(paths, enc, tmp_path / "o", samples=sheet,
                 cfg=tiny_cfg(epochs=1, final_model=False), progress=False)
    assert m["task"]["image_size"] == probe
    # a size set for embed (the probe) is fine-tuning's default too
    cfg = tiny_cfg(epochs=1, final_model=False)
    cfg.embed.image_size = 40
    m = finetune(paths, enc, tmp_path / "o2", samples=sheet, cfg=cfg, progress=False)
    assert m["task"]["image_size"] == 40


def test_the_loss_balances_the_classes_trained_on_and_the_validation_mix(encoder, tmp_path,
                                                                        monkeypatch):
    """Class weights follow the patches an epoch trains on (max_patches_per_slide caps the big
    SCC slides to the normal slides' size: equal classes, weights 1) and the validation loss
    balances the validation patients' own mix."""
    import torch

    from simclr_path import finetune as ft_mod

    rng = np.random.default_rng(1)
    rows, paths = [], []
    for i in range(8):
        scc = i % 2 == 0
        n, sid = (24 if scc else 4), f"S{i}"
        with PatchStoreWriter(tmp_path / f"{sid}.h5", patch_size=SIZE,
                              attrs={"slide_id": sid, "kind": "slide", "mpp": 0.5}) as w:
            w.append(_patches(rng, n, scc), np.stack([np.arange(n) * SIZE, np.zeros(n, int)], 1))
        paths.append(tmp_path / f"{sid}.h5")
        rows.append({"slide_id": sid, "path": f"{sid}.svs", "label": "SCC" if scc else "normal",
                     "patient_id": f"P{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    train_mass, val_mass = [], []
    ce, nll = ft_mod.F.cross_entropy, ft_mod.F.nll_loss

    def record(mass, y, weight):  # the loss weight each class carries in a call, in total
        mass.append(torch.bincount(y, weights=weight[y], minlength=2).tolist())

    def cross_entropy(logits, y, weight=None, **kw):
        record(train_mass, y, weight)
        return ce(logits, y, weight=weight, **kw)

    def nll_loss(logp, y, weight=None, **kw):
        record(val_mass, y, weight)
        return nll(logp, y, weight=weight, **kw)

    monkeypatch.setattr(ft_mod.F, "cross_entropy", cross_entropy)
    monkeypatch.setattr(ft_mod.F, "nll_loss", nll_loss)
    cfg = tiny_cfg(epochs=1, batch_size=64, max_patches_per_slide=4, final_model=False,
                   val_fraction=0.5)
    cfg.classify.bootstrap = 0
    finetune(paths, encoder, tmp_path / "o", samples=tmp_path / "s.tsv", cfg=cfg, progress=False)
    assert train_mass and val_mass
    for a, b in train_mass + val_mass:  # one batch an epoch here; one validation pass a fold
        assert a > 0 and a == pytest.approx(b), (train_mass, val_mass)


def test_the_mlflow_store_is_told_the_results_folders_final_name(cohort, encoder, tmp_path,
                                                                monkeypatch):
    """finetune writes into a temporary folder renamed at the end; the local MLflow store in
    it must record its artifacts under the final name (else MLflow lists none)."""
    import simclr_path.train as T

    fake_mlflow(monkeypatch)
    moved = []
    monkeypatch.setattr(T, "_move_mlflow_artifacts", lambda db, to: moved.append((db, to)))
    paths, sheet = cohort
    cfg = tiny_cfg(epochs=1, final_model=False)
    cfg.classify.bootstrap = 0
    cfg.train.mlflow, cfg.train.tensorboard = True, False
    finetune(paths, encoder, tmp_path / "res", samples=sheet, cfg=cfg, progress=False)
    ((db, to),) = moved
    assert to == tmp_path / "res" and db.name == "mlflow.db" and db.parent.parent == tmp_path
    assert db.parent.name.startswith(".res.") and not db.parent.exists()  # the temporary folder


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_an_interrupted_finetune_ends_its_mlflow_run_killed(cohort, encoder, tmp_path, monkeypatch,
                                                            error, status):
    """Ctrl-C marked the MLflow run FAILED, like a crash."""
    import simclr_path.finetune as FT

    calls = fake_mlflow(monkeypatch)

    def stop(*a, **k):
        raise error("stop")

    monkeypatch.setattr(FT._Run, "fit", stop)
    paths, sheet = cohort
    cfg = tiny_cfg(epochs=1, final_model=False)
    cfg.train.mlflow, cfg.train.tensorboard = True, False
    with pytest.raises(error):
        finetune(paths, encoder, tmp_path / "res", samples=sheet, cfg=cfg, progress=False)
    assert calls[-1] == ("set_terminated", ("r1", status), {})
    assert not (tmp_path / "res").exists()


def test_finetune_leaves_the_callers_torch_generator_alone(cohort, encoder, tmp_path):
    import torch

    paths, sheet = cohort
    cfg = tiny_cfg(epochs=1, final_model=False)
    cfg.classify.bootstrap = 0
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    finetune(paths, encoder, tmp_path / "o", samples=sheet, cfg=cfg, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_with_a_split_the_saved_model_is_the_evaluated_one(cohort, encoder, tmp_path):
    """The final model was trained again (other validation patients, another seed): its
    predictions differed from the evaluated fold's in predictions_patches.csv."""
    import torch

    paths, sheet = cohort
    df = pd.read_csv(sheet, sep="\t")
    df["split"] = ["test" if int(p[1:]) >= 6 else "train" for p in df["patient_id"]]
    df.to_csv(tmp_path / "split.tsv", sep="\t", index=False)
    cfg = tiny_cfg(epochs=2)
    cfg.classify.bootstrap = 0
    m = finetune(paths, encoder, tmp_path / "o", samples=tmp_path / "split.tsv", cfg=cfg,
                 progress=False)
    hist = pd.read_csv(tmp_path / "o" / "history.csv")
    assert set(hist["fold"].astype(str)) == {"fold0"}  # trained once
    model = load_classifier(tmp_path / "o")
    pp = pd.read_csv(tmp_path / "o" / "predictions_patches.csv")
    test = pp[pp["fold"] == 0]
    from simclr_path.store import PatchStore

    x = []
    for sid, rows in test.groupby("slide_id", sort=False):
        with PatchStore(next(p for p in paths if p.stem == sid)) as s:
            x.append(s[np.asarray(rows["patch_index"])])
    with torch.no_grad():
        from simclr_path.transforms import eval_transform

        logits = model(eval_transform(np.concatenate(x), m["task"]["image_size"]))
    proba = torch.softmax(logits, 1).numpy()
    classes = m["task"]["classes"]
    expected = np.concatenate([rows[[f"prob_{c}" for c in classes]].to_numpy()
                               for _, rows in test.groupby("slide_id", sort=False)])
    np.testing.assert_allclose(proba, expected, atol=1e-4)


def test_a_classifier_file_of_another_shape_is_one_error(result, tmp_path):
    import shutil

    import torch

    _, out = result
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    head = torch.load(bad / "classifier.pt", weights_only=True)
    torch.save({k: v[:1] for k, v in head.items()}, bad / "classifier.pt")
    with pytest.raises(SimclrPathError, match=r"classifier.pt: not the linear head of this "
                                              r"encoder and its 2 classes"):
        load_classifier(bad)


def test_a_store_without_mpp_beside_scaled_ones_is_warned_about(cohort, tmp_path):
    paths, sheet = cohort
    from simclr_path.store import PatchStore

    with PatchStore(paths[0]) as s:
        patches, coords = s[np.arange(len(s))], np.asarray(s.coords)
    odd = tmp_path / "S0.h5"
    with PatchStoreWriter(odd, patch_size=SIZE, attrs={"slide_id": "S0", "kind": "slide"}) as w:
        w.append(patches, coords)
    with pytest.warns(UserWarning, match=r"S0.h5: no mpp recorded .* at 0.5 um/px"):
        load_patch_table([odd, *paths[1:]], sheet, tiny_cfg())


def test_resume_keeps_the_folds_an_interrupted_run_finished(cohort, encoder, tmp_path,
                                                            monkeypatch, capsys):
    """A killed fine-tuning (a GPU job's time limit) trained every fold again; --resume now
    continues at its first unfinished fold and ends with the uninterrupted run's results."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simclr_path import finetune as ft_mod

    paths, sheet = cohort
    cfg = tiny_cfg(epochs=2, final_model=False)
    whole = finetune(paths, encoder, tmp_path / "whole", samples=sheet, cfg=cfg, progress=False)
    fit, names = ft_mod._Run.fit, []

    def fit_until_fold1(self, name, *a, **k):
        names.append(name)
        if name == "fold1" and kill:
            raise KeyboardInterrupt
        return fit(self, name, *a, **k)

    monkeypatch.setattr(ft_mod._Run, "fit", fit_until_fold1)
    out, folds = tmp_path / "o", tmp_path / ".o.folds"

    def killed(c, resume=False):
        names.clear()
        capsys.readouterr()
        with pytest.raises(KeyboardInterrupt):
            finetune(paths, encoder, out, samples=sheet, cfg=c, progress=False, resume=resume)
        assert not out.exists() and not list(folds.glob("fold1-*"))
        return capsys.readouterr().err

    kill = True
    killed(cfg)
    assert names == ["fold0", "fold1"] and len(list(folds.glob("fold0-*.json"))) == 1
    # without --resume the finished fold trains again, and the message says how to keep it
    assert "finished fold(s) 0; training them again (--resume keeps them)" in killed(cfg)
    assert names == ["fold0", "fold1"]
    # other inputs (here more epochs) never reuse a fold, with --resume either
    assert "no finished folds of these inputs" in killed(tiny_cfg(epochs=1, final_model=False),
                                                         resume=True)
    assert names == ["fold0", "fold1"] and len(list(folds.glob("fold0-*.json"))) == 2
    # a damaged fold (a power cut: an empty file) trains again, and is saved again
    mine = [f for f in folds.glob("fold0-*.npz")
            if f.stat().st_mtime == min(g.stat().st_mtime for g in folds.glob("fold0-*.npz"))]
    mine[0].write_bytes(b"")
    assert "fold 0 cannot be read (EOFError); it trains again" in killed(cfg, resume=True)
    assert names == ["fold0", "fold1"] and mine[0].stat().st_size > 0
    kill = False
    names.clear()
    code = main(["finetune", *map(str, paths), "--encoder", str(encoder), "--samples", str(sheet),
                 "--out", str(out), "--no-progress", "--resume",
                 "--config", str(_cfg_file(tmp_path, cfg))])
    assert code == 0 and names == ["fold1"]  # fold 0 kept
    assert "fold(s) 0 kept" in capsys.readouterr().err
    assert not folds.exists()  # removed once the results are in place, the other key's too
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("patch", "slide"):
        assert resumed[key] == whole[key]
    assert [f["best_epoch"] for f in resumed["folds"]] == [f["best_epoch"] for f in whole["folds"]]
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions_patches.csv"),
                                  pd.read_csv(tmp_path / "whole" / "predictions_patches.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv").drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "whole" / "history.csv")
                                  .drop(columns="seconds"))
    # the kept fold's epochs are in the trackers too
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("fold0/train_loss")) == 2 and len(acc.Scalars("fold1/train_loss")) == 2
    # a folder of that name that fine-tuning did not make is never emptied or written into
    folds.mkdir()
    (folds / "notes.txt").write_text("mine")
    with pytest.raises(SimclrPathError, match=r"\.o\.folds: is in the way of the folder where "
                                              "fine-tuning keeps its finished folds"):
        finetune(paths, encoder, out, samples=sheet, cfg=cfg, progress=False, force=True)
    assert [p.name for p in folds.iterdir()] == ["notes.txt"]


def test_a_fold_that_cannot_be_kept_does_not_stop_the_run(cohort, encoder, tmp_path,
                                                         monkeypatch):
    """Keeping folds is a convenience: a full disk (or a run at the same output that removed
    the folder) warned and went on, where it stopped the fine-tuning with a traceback."""
    from simclr_path import finetune as ft_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ft_mod.np, "savez", full)
    paths, sheet = cohort
    with pytest.warns(UserWarning, match=r"cannot keep fold 0 for --resume \(\[Errno 28\] No "
                                         r"space left on device\); the run goes on"):
        m = finetune(paths, encoder, tmp_path / "o", samples=sheet,
                     cfg=tiny_cfg(epochs=1, final_model=False), progress=False)
    assert m["patch"]["auroc"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _cfg_file(tmp_path, cfg):
    """``cfg``'s finetune and classify sections as a YAML file for the CLI."""
    from dataclasses import asdict

    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"finetune": asdict(cfg.finetune),
                                    "classify": asdict(cfg.classify)}))
    return path
