from __future__ import annotations

import numpy as np
import pytest
import torch

from simclr_path.cli import main
from simclr_path.config import EmbedConfig
from simclr_path.embed import dihedral_views, embed_store, file_sha256, fixres_size, preprocess
from simclr_path.errors import SimclrPathError
from simclr_path.model import create_backbone, load_encoder, save_encoder
from simclr_path.store import EmbeddingStore, PatchStore

ARCH = "resnet18"
STAGE_CHANNELS = [64, 64, 128, 256, 512]  # timm feature_info of resnet18: stem, layer1-4


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(create_backbone(ARCH), path, ARCH, image_size=32, mpp=0.5)
    return path


def test_embed_pooled_matches_one_by_one(encoder, make_store, tmp_path):
    store = make_store(n=10, size=40)  # patches are resized from 40 to the encoder's 32 px
    out = embed_store(
        encoder, store, tmp_path / "emb.h5", EmbedConfig(batch_size=4, workers=0), progress=False
    )
    e = EmbeddingStore(out)
    assert e.features.shape == (10, 512) and e.features.dtype == np.float32
    assert (
        e.attrs["slide_id"] == "S1" and e.attrs["layer"] == "pooled" and e.attrs["image_size"] == 32
    )
    assert e.attrs["encoder_sha256"] == file_sha256(encoder) and e.attrs["arch"] == ARCH
    assert e.attrs["source_store"] == str(store)
    np.testing.assert_array_equal(e.coords[:, 0], np.arange(10) * 40)
    model = load_encoder(encoder)
    from simclr_path.store import PatchStore

    ps = PatchStore(store)
    with torch.no_grad():
        ref = np.stack(
            [model(preprocess(torch.from_numpy(ps[i]), 32))[0].numpy() for i in range(10)]
        )
    np.testing.assert_allclose(e.features, ref, rtol=1e-4, atol=1e-4)


def test_layerwise_dimensions(encoder, make_store, tmp_path):
    store = make_store(n=6, size=32)
    for stage, ch in enumerate(STAGE_CHANNELS):
        out = embed_store(
            encoder,
            store,
            tmp_path / f"s{stage}.h5",
            EmbedConfig(layer=f"stage{stage}", workers=0),
            progress=False,
        )
        e = EmbeddingStore(out)
        assert e.features.shape == (6, ch) and e.attrs["layer"] == f"stage{stage}"
    # the last stage pooled is the backbone's pooled output (resnet: global average pool of layer4)
    pooled = embed_store(encoder, store, tmp_path / "p.h5", EmbedConfig(workers=0), progress=False)
    np.testing.assert_allclose(
        EmbeddingStore(pooled).features,
        EmbeddingStore(tmp_path / "s4.h5").features,
        rtol=1e-4,
        atol=1e-5,
    )
    with pytest.raises(SimclrPathError, match="stage0 ... stage4"):
        embed_store(
            encoder, store, tmp_path / "bad.h5", EmbedConfig(layer="stage9"), progress=False
        )
    assert not (tmp_path / "bad.h5").exists()


def test_labels_groups_workers_and_image_size(encoder, make_store, tmp_path):
    labels = np.array([0, 1] * 6)
    groups = [f"g{i // 4}" for i in range(12)]
    store = make_store(
        n=12, size=32, label_names=["lung_n", "lung_scc"], labels=labels, groups=groups
    )
    out = embed_store(
        encoder,
        store,
        tmp_path / "e.h5",
        EmbedConfig(batch_size=4, workers=1, image_size=48),
        progress=False,
    )
    e = EmbeddingStore(out)
    assert e.features.shape == (12, 512) and e.attrs["image_size"] == 48
    np.testing.assert_array_equal(e.labels, labels)
    assert e.groups == groups and e.label_names == ["lung_n", "lung_scc"]


def test_empty_store_gives_empty_file(encoder, tmp_path):
    from simclr_path.store import PatchStoreWriter

    with PatchStoreWriter(tmp_path / "empty.h5", 32, attrs={"slide_id": "E"}):
        pass
    with pytest.warns(UserWarning, match="no patches"):
        out = embed_store(encoder, tmp_path / "empty.h5", tmp_path / "e.h5", progress=False)
    assert EmbeddingStore(out).features.shape == (0, 512)


def test_a_store_where_the_encoder_goes_is_named_as_such(encoder, make_store, tmp_path):
    """embed_store(store, encoder, out) said 'T1.json: encoder metadata of T1.h5 not found'."""
    store = make_store(n=4)
    with pytest.raises(SimclrPathError, match=r"is an HDF5 file \(a patch store or embedding "
                                              r"file\?\), not an encoder; .*takes the encoder first"):
        embed_store(store, encoder, tmp_path / "e.h5", progress=False)
    assert not (tmp_path / "e.h5").exists()


def test_an_output_that_cannot_be_written_fails_before_embedding(encoder, make_store, tmp_path,
                                                                  monkeypatch):
    import simclr_path.embed as embed_mod

    store = make_store(n=4)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")

    def no_model(*a, **k):
        raise AssertionError("the encoder was loaded before the output was checked")

    monkeypatch.setattr(embed_mod, "load_encoder", no_model)
    for out, msg in ((tmp_path / "folder", "is a folder"), (tmp_path / "file" / "e.h5", "file")):
        with pytest.raises(SimclrPathError, match=msg):
            embed_store(encoder, store, out, force=True, progress=False)


def test_embed_cli(encoder, make_store, tmp_path, capsys):
    store = make_store(n=5, size=32)
    out = tmp_path / "cli.h5"
    args = [
        "embed",
        str(store),
        "--encoder",
        str(encoder),
        "--out",
        str(out),
        "--workers",
        "0",
        "--layer",
        "stage2",
    ]
    assert main(args) == 0
    assert EmbeddingStore(out).features.shape == (5, 128)
    capsys.readouterr()
    assert main(args) != 0  # exists, no --force
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert main([*args, "--force", "--layer", "conv"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "embed.layer" in err[0]
    assert (
        main(
            [
                "embed",
                str(store),
                "--encoder",
                str(tmp_path / "none.pt"),
                "--out",
                str(tmp_path / "x.h5"),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder file not found" in err[0]
    assert not (tmp_path / "x.h5").exists()


def test_head_layer(encoder, make_store, tmp_path):
    import simclr_path.model as model_mod

    store = make_store(n=4, size=32)
    if not hasattr(model_mod, "load_projection_head"):
        with pytest.raises(SimclrPathError, match="projection head"):
            embed_store(
                encoder, store, tmp_path / "h.h5", EmbedConfig(layer="head"), progress=False
            )
    else:  # the run directory has no head for this bare encoder: a clear error either way
        with pytest.raises(SimclrPathError):
            embed_store(
                encoder, store, tmp_path / "h.h5", EmbedConfig(layer="head"), progress=False
            )
    assert not (tmp_path / "h.h5").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_gpu(encoder, make_store, tmp_path, capsys):
    store = make_store(n=2, size=32)
    assert (
        main(
            [
                "embed",
                str(store),
                "--encoder",
                str(encoder),
                "--out",
                str(tmp_path / "c.h5"),
                "--device",
                "cuda",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]
    assert not (tmp_path / "c.h5").exists()


def test_fixres_size_matches_the_mean_crop_magnification():
    # crop area U(0.2, 1): mean side fraction 2/3 (1 - 0.2^1.5) / 0.8 = 0.759 -> 96 / 0.759 = 126.5
    assert fixres_size(96, [0.2, 1.0], 224) == 128
    assert fixres_size(64, [0.2, 1.0], 224) == 88  # 84.3 rounded to a multiple of 8
    assert fixres_size(96, [0.25, 0.25], 224) == 192  # fixed half-side crops: twice the size
    assert fixres_size(224, [0.2, 1.0], 224) == 224  # never past the stored pixels
    assert fixres_size(96, [0.2, 1.0], 64) == 96  # nor below the training size
    assert fixres_size(96, [1.0, 1.0], 224) == 96  # whole-patch training: no change
    assert fixres_size(96, None, 224) == 96  # encoders without a recorded crop scale
    # patches of another physical side than the training ones: the same tissue scale
    assert fixres_size(128, [0.2, 1.0], 448, side_ratio=2.0) == 336  # 168 x 2
    assert fixres_size(128, [0.2, 1.0], 112, side_ratio=0.5) == 88  # 168 / 2 = 84 -> 88
    assert fixres_size(128, [0.2, 1.0], 224, side_ratio=1.0) == 168  # same side: as before
    assert fixres_size(96, None, 448, side_ratio=2.0) == 192


def test_patches_of_another_side_keep_the_scale_of_the_training_patches_embeddings():
    """The workflow's encoder: 64 px views of 64 px patches at 1 um/px, embedded at 64 (the
    stored pixels cap FixRes' 88), 1 um per input pixel; a new slide tiled at 224 px and 0.5
    um/px was embedded at 144 px (0.78 um per input pixel) and predict refused it."""
    from types import SimpleNamespace

    from simclr_path.classify import input_mpp
    from simclr_path.embed import default_image_size, tissue_scale_mismatch

    info = {"image_size": 64, "crop_scale": [0.2, 1.0], "patch_size": 64, "mpp": 1.0}
    own = SimpleNamespace(mpp=1.0, patch_size=64)
    new = SimpleNamespace(mpp=0.5, patch_size=224)
    sizes = default_image_size(info, own), default_image_size(info, new)
    assert sizes == (64, 112)
    assert input_mpp({"patch_size": 64, "mpp": 1.0, "image_size": sizes[0]}) == input_mpp(
        {"patch_size": 224, "mpp": 0.5, "image_size": sizes[1]}) == 1.0
    assert tissue_scale_mismatch(info, new, sizes[1]) is None
    assert fixres_size(64, [0.2, 1.0], 224, side_ratio=1.75, train_patch_size=64) == 112
    # training patches FixRes does not reach: as before (168 x 2)
    assert fixres_size(128, [0.2, 1.0], 448, side_ratio=2.0, train_patch_size=224) == 336
    # the same tissue side in twice the pixels (0.5 um/px at 128 px against 1 um/px at 64):
    # the training patches' size, as at any ratio near 1; a ratio of exactly 1 gave 88, and
    # classify refused the embeddings beside the training slides' 64 px ones
    for ratio in (0.999, 1.0, 1.001):
        assert fixres_size(64, [0.2, 1.0], 128, side_ratio=ratio, train_patch_size=64) == 64
    twice = SimpleNamespace(mpp=0.5, patch_size=128)
    assert default_image_size(info, twice) == 64 and tissue_scale_mismatch(info, twice, 64) is None
    # the default preset's 224 px at 0.5 um/px, a 40x slide tiled at 0.25 um/px and 448 px
    assert fixres_size(224, [0.08, 1.0], 448, side_ratio=1.0, train_patch_size=224) == 224


def test_tissue_scale_mismatch_is_judged_on_the_tissue_per_input_pixel():
    from types import SimpleNamespace

    from simclr_path.embed import default_image_size, tissue_scale_mismatch

    # views of crop area 0.2-1 at 128 px showed 224 px patches' tissue as at 128-286 px
    info = {"image_size": 128, "crop_scale": [0.2, 1.0], "patch_size": 224, "mpp": 0.5}
    same = SimpleNamespace(mpp=0.5, patch_size=224)
    finer = SimpleNamespace(mpp=0.25, patch_size=448)  # the same field of view, twice the pixels
    coarse = SimpleNamespace(mpp=1.0, patch_size=112)  # half the pixels of the same tissue
    for store in (same, finer, coarse):  # embed's own size matches, whatever the store's mpp
        assert tissue_scale_mismatch(info, store, default_image_size(info, store)) is None
    # the old rule (the mpp differs) warned about `finer` although embed had compensated
    assert default_image_size(info, finer) == 168
    assert tissue_scale_mismatch(info, same, 224) is None  # inside the range the views covered
    assert tissue_scale_mismatch(info, same, 128) is None  # a whole-patch view's scale
    msg = tissue_scale_mismatch(info, same, 96)  # a size given by hand, below every view
    assert msg.startswith("at 96 px its 224 px patches at 0.5 um/px show tissue smaller than in "
                          "any training view") and "128-286 px for these patches" in msg
    assert "tile at" not in msg
    assert "larger than in any" in tissue_scale_mismatch(info, same, 336)
    # 64 px of 2 um/px hold a little more tissue than the training patches in under a third of
    # their pixels: no size up to the stored one reaches the 146 px of the whole-patch views
    few = SimpleNamespace(mpp=2.0, patch_size=64)
    assert default_image_size(info, few) == 64
    msg = tissue_scale_mismatch(info, few, 64)
    assert "more than the 64 stored pixels; tile at --mpp 0.88 or finer" in msg
    # views as large as the patches (the package defaults, the demo): whole patches at the
    # training size are the largest crops' scale, not a mismatch
    full = {"image_size": 224, "crop_scale": [0.2, 1.0], "patch_size": 224, "mpp": 0.5}
    assert default_image_size(full, same) == 224 and tissue_scale_mismatch(full, same, 224) is None
    assert tissue_scale_mismatch({"mpp": 0.5}, coarse, 112).startswith(
        "patches are at 1 um/px but the encoder was trained at 0.5 um/px")  # no training size
    assert tissue_scale_mismatch(info, SimpleNamespace(mpp=None, patch_size=224), 64) is None


def test_embed_warns_about_a_hand_picked_size_with_the_fix(make_store, tmp_path):
    import warnings

    enc = tmp_path / "encoder.pt"
    store = make_store(n=4, size=64)
    mpp = PatchStore(store).mpp
    save_encoder(create_backbone(ARCH), enc, ARCH, image_size=32, crop_scale=[0.2, 1.0],
                 patch_size=64, mpp=mpp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # embed's own size, or any inside the views' range
        embed_store(enc, store, tmp_path / "a.h5", EmbedConfig(workers=0), progress=False)
        embed_store(enc, store, tmp_path / "c.h5", EmbedConfig(workers=0, image_size=64),
                    progress=False)
    with pytest.warns(UserWarning, match=r"tissue smaller than in any training view .*leave "
                      r"--image-size out to match it"):
        embed_store(enc, store, tmp_path / "b.h5", EmbedConfig(workers=0, image_size=16),
                    progress=False)


def test_default_size_follows_the_encoders_crop_scale(make_store, tmp_path):
    torch.manual_seed(0)
    enc = tmp_path / "encoder.pt"
    save_encoder(create_backbone(ARCH), enc, ARCH, image_size=32, crop_scale=[0.2, 1.0])
    store = make_store(n=4, size=64)
    out = embed_store(enc, store, tmp_path / "e.h5", EmbedConfig(workers=0), progress=False)
    assert EmbeddingStore(out).attrs["image_size"] == 40  # 32 / 0.759 = 42.2 -> 40
    out = embed_store(enc, store, tmp_path / "f.h5", EmbedConfig(workers=0, image_size=32),
                      progress=False)  # an explicit size wins
    assert EmbeddingStore(out).attrs["image_size"] == 32
    # trained on 32 px patches at the store's mpp: its 64 px patches hold twice the tissue side
    mpp = PatchStore(store).mpp
    assert mpp
    save_encoder(create_backbone(ARCH), enc, ARCH, force=True, image_size=32,
                 crop_scale=[0.2, 1.0], patch_size=32, mpp=mpp)
    out = embed_store(enc, store, tmp_path / "g.h5", EmbedConfig(workers=0), progress=False)
    assert EmbeddingStore(out).attrs["image_size"] == 64  # 42.2 x 2 = 84 -> at most 64 px
    # the same field of view (64 px at half the mpp): the size the training patches got (32,
    # their stored pixels; FixRes' 40 gave another tissue scale than the training embeddings)
    save_encoder(create_backbone(ARCH), enc, ARCH, force=True, image_size=32,
                 crop_scale=[0.2, 1.0], patch_size=32, mpp=2 * mpp)
    out = embed_store(enc, store, tmp_path / "h.h5", EmbedConfig(workers=0), progress=False)
    assert EmbeddingStore(out).attrs["image_size"] == 32


def test_dihedral_views_are_the_8_distinct_symmetries():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({v.numpy().tobytes() for v in views}) == 8
    # closed under rotation: the views of a rotated batch are the same set
    rot = {v.numpy().tobytes() for v in dihedral_views(torch.rot90(x, 1, dims=(2, 3)))}
    assert rot == {v.numpy().tobytes() for v in views}


def test_tta_features_do_not_depend_on_orientation(encoder, tmp_path):
    from simclr_path.store import PatchStoreWriter

    rng = np.random.default_rng(1)
    patches = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    coords = np.zeros((5, 2), dtype=np.int64)
    stores = {}
    for name, p in (("orig", patches), ("turned", np.ascontiguousarray(np.rot90(patches, 1, (1, 2))[:, :, ::-1]))):
        stores[name] = tmp_path / f"{name}.h5"
        with PatchStoreWriter(stores[name], patch_size=32, attrs={"slide_id": name, "mpp": 0.5}) as w:
            w.append(p, coords)

    def feats(name, tta):
        cfg = EmbedConfig(workers=0, tta=tta, batch_size=3)
        out = embed_store(encoder, stores[name], tmp_path / f"{name}-{tta}.h5", cfg, force=True,
                          progress=False)
        e = EmbeddingStore(out)
        assert e.attrs["tta"] == tta
        return e.features

    assert not np.allclose(feats("orig", False), feats("turned", False), atol=1e-3)
    np.testing.assert_allclose(feats("orig", True), feats("turned", True), rtol=1e-4, atol=1e-4)
    # the TTA feature is the mean of the 8 plain features
    model = load_encoder(encoder)
    with torch.no_grad():
        x = preprocess(torch.from_numpy(patches), 32)
        ref = torch.stack([model(v) for v in dihedral_views(x)]).mean(0).numpy()
    np.testing.assert_allclose(feats("orig", True), ref, rtol=1e-4, atol=1e-4)


def test_embed_cli_tta_flag(encoder, make_store, tmp_path, capsys):
    store = make_store(n=3, size=32)
    base = ["embed", str(store), "--encoder", str(encoder), "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "t.h5"), "--tta"]) == 0
    assert main([*base, "--out", str(tmp_path / "p.h5")]) == 0
    assert bool(EmbeddingStore(tmp_path / "t.h5").attrs["tta"])
    assert not bool(EmbeddingStore(tmp_path / "p.h5").attrs["tta"])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "t.h5")]) == 0
    assert "image size 32 tta" in capsys.readouterr().out


def test_the_python_api_never_writes_over_its_own_inputs(encoder, make_store, tmp_path):
    """force=True in Python is --force on the command line: it replaces earlier outputs, never
    the store or the encoder the call reads."""
    store = make_store(n=4, size=32)
    before = store.read_bytes()
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(store_path\)"):
        embed_store(encoder, store, store, force=True, progress=False)
    with pytest.raises(SimclrPathError, match="is inside the input folder"):
        embed_store(encoder.parent, store, encoder.parent / "encoder.pt", force=True,
                    progress=False)
    meta = encoder.with_suffix(".json")
    text = meta.read_text()
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(encoder metadata\)"):
        embed_store(encoder, store, meta, force=True, progress=False)
    assert store.read_bytes() == before and encoder.is_file() and meta.read_text() == text


def test_preprocess_constants_made_under_inference_mode_still_take_gradients():
    """embed makes the cached normalisation constants inside torch.inference_mode; a later
    preprocess whose input needs gradients (a saliency map) must still build its graph."""
    from simclr_path.embed import _normalisation

    _normalisation.cache_clear()
    with torch.inference_mode():
        preprocess(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), 8)
    x = torch.rand(1, 8, 8, 3, requires_grad=True)
    preprocess(x * 255, 8).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_inputs_below_the_output_stride_warn_and_a_huge_size_is_one_error(encoder, make_store,
                                                                            tmp_path):
    """pretrain refuses views smaller than the backbone's output stride; embed ran them without
    a word. A huge --image-size failed allocating the probe patch, a traceback."""
    store = make_store(n=4, size=32)
    with pytest.warns(UserWarning, match=r"embedding at 16 px, below resnet18's output stride "
                                         r"\(32 px\).*tile with a larger --patch-size"):
        embed_store(encoder, store, tmp_path / "a.h5", EmbedConfig(workers=0, image_size=16),
                    progress=False)
    with pytest.raises(SimclrPathError, match=r"embed.image_size must be between 8 and 4096"):
        EmbedConfig(workers=0, image_size=1_000_000)
    assert main(["embed", str(store), "--encoder", str(encoder), "--out", str(tmp_path / "b.h5"),
                 "--image-size", "99999999999999999999"]) == 2
    assert not (tmp_path / "b.h5").exists()


def test_preprocess_is_the_imagenet_normalised_resize_of_the_patch():
    """embed's own transform against the formula: the reference of the embedding tests is
    built with preprocess itself, so a missing normalisation passed them."""
    import torch.nn.functional as F

    from simclr_path.transforms import eval_transform

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    f = x.permute(0, 3, 1, 2).float() / 255
    for size in (48, 32):
        ref = f if size == 48 else F.interpolate(f, size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)
        ref = (ref - mean) / std
        torch.testing.assert_close(preprocess(x, size), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eval_transform(x, size), ref, rtol=1e-5, atol=1e-5)


def test_embeddings_of_a_fine_tuned_encoder_say_so(make_store, tmp_path):
    """classify could not tell embeddings of an encoder fine-tuned with labels (finetune's
    final model) from a self-supervised one's, and evaluated its training patients in silence."""
    store = make_store(n=3, size=32)
    for name, extra in (("plain", {}), ("tuned", {"fine_tuned_from": "runs/a/encoder.pt"})):
        enc = tmp_path / name / "encoder.pt"
        enc.parent.mkdir()
        save_encoder(create_backbone(ARCH), enc, ARCH, image_size=32, mpp=0.5, **extra)
        out = embed_store(enc, store, tmp_path / f"{name}.h5", EmbedConfig(workers=0),
                          progress=False)
        assert EmbeddingStore(out).attrs.get("fine_tuned_from") == extra.get("fine_tuned_from")


def test_a_batch_copied_from_a_gpu_is_read_only_after_its_copy_is_done():
    """embed's overlap: a blocking .cpu() of batch k waited for batch k+1 too; the copy now runs
    without blocking and rows are read once its event says it is done."""
    from simclr_path.embed import _store_rows, _to_host

    z = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    assert _to_host(z) == (z, None)  # CPU tensors as they are

    class Done:
        synced = False

        def synchronize(self):
            self.synced = True

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    feats, done, bar = np.zeros((4, 2), np.float32), Done(), Bar()
    assert _store_rows(feats, 1, (z, done), bar) == 4 and done.synced and bar.n == 3
    assert feats[1:].tolist() == z.tolist() and not feats[0].any()


def test_a_full_gpu_while_checking_the_input_size_is_not_called_a_wrong_size(encoder, make_store,
                                                                               tmp_path,
                                                                               monkeypatch):
    import simclr_path.embed as E

    def full(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(E, "preprocess", full)
    with pytest.raises(SimclrPathError, match="one 32 px patch does not fit in the GPU's free "
                                              "memory; free the GPU .* or lower --image-size"):
        embed_store(encoder, make_store(n=2, size=32), tmp_path / "e.h5", EmbedConfig(workers=0),
                    progress=False)


@pytest.mark.parametrize("value", [float("nan"), 1e20])  # 1e20: classify would refuse it
def test_an_encoder_that_gives_nan_features_is_one_error_and_no_file(encoder, make_store,
                                                                     tmp_path, monkeypatch, value):
    """The finite check runs in slices of the table (a whole-table mask is a quarter of its
    size again); a NaN in any slice still stops the embedding before a file is written."""
    import simclr_path.embed as E

    real = E.FeatureExtractor.forward

    def broken(self, x):
        z = real(self, x)
        z[-1, 0] = value  # the last patch of each batch
        return z

    monkeypatch.setattr(E.FeatureExtractor, "forward", broken)
    store = make_store(n=10)
    with pytest.raises(SimclrPathError, match="encoder produced NaN, infinite or implausibly large"):
        embed_store(encoder, store, tmp_path / "e.h5", EmbedConfig(workers=0, batch_size=4),
                    progress=False)
    assert not (tmp_path / "e.h5").exists()
