"""Two-view augmentations: stain jitter physics, ranges, shapes, determinism, preview PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simclr_path.config import AugmentConfig
from simclr_path.errors import SimclrPathError
from simclr_path.transforms import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    ColorAugment,
    GeometricViews,
    color_jitter,
    eval_transform,
    gaussian_blur,
    stain_jitter,
    to_float,
)


def _he_like(n=4, size=24, seed=0) -> torch.Tensor:
    """uint8 (n, size, size, 3): a pink/purple tissue half and a white background half."""
    rng = np.random.default_rng(seed)
    x = np.full((n, size, size, 3), 255, dtype=np.uint8)
    tissue = rng.normal([180, 110, 170], 20, size=(n, size, size // 2, 3))
    x[:, :, : size // 2] = np.clip(tissue, 0, 255).astype(np.uint8)
    return torch.from_numpy(x)


def test_stain_matrices_match_skimage():
    skc = pytest.importorskip("skimage.color")
    assert np.allclose(RGB_FROM_HED.numpy(), skc.rgb_from_hed, atol=1e-6)
    assert np.allclose(HED_FROM_RGB.numpy(), skc.hed_from_rgb, atol=1e-6)


def test_stain_jitter_identity_range_and_white_background():
    x = to_float(_he_like())
    n = x.shape[0]
    same = stain_jitter(x, torch.ones(n, 3), torch.zeros(n, 3))
    assert torch.allclose(same, x.clamp(min=1 / 255), atol=1e-5)
    for alpha, beta in ((1.3, 0.2), (0.7, -0.2), (1.5, 0.5)):
        y = stain_jitter(x, torch.full((n, 3), alpha), torch.full((n, 3), beta))
        assert y.min() >= 0 and y.max() <= 1
        assert (y[..., 12:] >= 0.99).all(), "white background must stay white"
        assert (y[..., :12] - x[..., :12]).abs().mean() > 0.02, "tissue must change"


def test_stain_jitter_changes_haematoxylin_only_when_asked():
    x = to_float(_he_like(n=1))
    alpha = torch.tensor([[1.5, 1.0, 1.0]])
    y = stain_jitter(x, alpha, torch.zeros(1, 3))
    od = lambda t: -torch.log(t.clamp(min=1 / 255))
    hed_x = torch.einsum("bchw,cs->bshw", od(x), HED_FROM_RGB.float())
    hed_y = torch.einsum("bchw,cs->bshw", od(y), HED_FROM_RGB.float())
    tissue = (slice(None), slice(None), slice(None), slice(0, 12))
    ratio = hed_y[tissue][:, 0].mean() / hed_x[tissue][:, 0].mean()
    assert abs(ratio - 1.5) < 0.1
    # eosin is untouched except where clamping to the valid range kicks in
    assert (hed_y[tissue][:, 1] - hed_x[tissue][:, 1]).abs().median() < 1e-4


def test_color_jitter_and_blur_identity_and_range():
    x = to_float(_he_like())
    n = x.shape[0]
    ones, zeros = torch.ones(n), torch.zeros(n)
    assert torch.allclose(color_jitter(x, ones, ones, ones, zeros), x, atol=1e-5)
    y = color_jitter(x, ones * 1.5, ones * 0.5, ones * 2, ones * 0.1)
    assert y.min() >= 0 and y.max() <= 1
    b = gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0, 5.0]))
    assert b.shape == x.shape
    assert b[3].std() < x[3].std()  # blurred
    assert torch.allclose(b.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05)


def test_color_augment_shapes_range_and_determinism():
    cfg = AugmentConfig(image_size=24, stain_p=1.0, color_p=1.0, blur_p=0.5, grayscale_p=0.5,
                        stain_scale=0.3, stain_shift=0.3)
    aug = ColorAugment(cfg)
    v = _he_like(n=8)
    a = aug(v, torch.Generator().manual_seed(1), normalize_output=False)
    b = aug(v, torch.Generator().manual_seed(1), normalize_output=False)
    c = aug(v, torch.Generator().manual_seed(2), normalize_output=False)
    assert a.shape == (8, 3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # samples differ from one another: parameters are drawn per sample
    same_input = v[:1].expand(8, -1, -1, -1).contiguous()
    d = aug(same_input, torch.Generator().manual_seed(3), normalize_output=False)
    assert (d[0] - d[1:]).abs().amax(dim=(1, 2, 3)).min() > 0
    normed = aug(v, torch.Generator().manual_seed(1))
    assert normed.min() < 0  # ImageNet-normalised


def test_no_augmentation_is_identity():
    cfg = AugmentConfig(image_size=24, stain_p=0, color_p=0, blur_p=0, grayscale_p=0)
    v = _he_like()
    out = ColorAugment(cfg)(v, torch.Generator().manual_seed(0), normalize_output=False)
    assert torch.allclose(out, to_float(v))


def test_geometric_views_shapes_and_determinism():
    cfg = AugmentConfig(image_size=16)
    geo = GeometricViews(cfg)
    patch = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a1, a2 = geo.views(patch, seed=5)
    b1, b2 = GeometricViews(cfg).views(patch, seed=5)
    assert a1.shape == (16, 16, 3) and a1.dtype == np.uint8
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert not np.array_equal(a1, a2)


def test_flips_are_not_correlated():
    cfg = AugmentConfig(image_size=8, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], rot90=0.0)
    geo = GeometricViews(cfg)
    patch = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    geo.seed(0)
    kinds = set()
    for _ in range(40):
        v = geo(patch)
        kinds.add((np.array_equal(v, patch[:, ::-1]), np.array_equal(v, patch[::-1]),
                   np.array_equal(v, patch[::-1, ::-1])))
    assert len(kinds) == 4  # none, h, v, both all occur


def test_eval_transform():
    x = _he_like(n=2, size=32)
    y = eval_transform(x, 16)
    assert y.shape == (2, 3, 16, 16)
    z = eval_transform(x.numpy()[0], 32, channels_last=True)
    assert z.shape == (1, 3, 32, 32) and z.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(z[0], (x[0].permute(2, 0, 1).float() / 255 - mean) / std, atol=1e-5)


def test_preview_writes_a_png(make_store, tmp_path):
    from PIL import Image

    from simclr_path.transforms import preview

    s1 = make_store(n=6, size=32, name="a.h5", slide_id="A")
    s2 = make_store(n=4, size=32, name="b.h5", slide_id="B", seed=1)
    out = preview([s1, s2], tmp_path / "p.png", AugmentConfig(image_size=24), n_pairs=3, seed=0)
    img = np.asarray(Image.open(out).convert("L"))
    assert img.shape[0] > 200 and img.shape[1] > 150
    assert img.std() > 10  # not blank


def test_preview_titles_keep_a_long_slide_id_in_its_column(make_store, tmp_path, monkeypatch):
    """A TCGA-style id ran over the next column's title and pushed the grid aside."""
    from simclr_path import figures
    from simclr_path.transforms import preview

    sid = "TCGA-A0-A0SB-01Z-00-DX1.B34C267B-CAA4-4BDE-9BB9-3F9C8C3E6B7E"
    s = make_store(n=4, size=32, name="a.h5", slide_id=sid)
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, force=False: drawn.append(fig))
    preview([s], tmp_path / "p.png", AugmentConfig(image_size=24), n_pairs=2, seed=0)
    fig = drawn[0]
    fig.canvas.draw()
    first, second = fig.axes[0], fig.axes[1]
    title = first.get_title()  # both ends kept: the project's prefix, the id's own tail, the patch
    assert title.startswith("patch TCGA-A0-") and "\u2026" in title and "6B7E #" in title
    renderer = fig.canvas.get_renderer()
    assert first.title.get_window_extent(renderer).x1 < second.title.get_window_extent(renderer).x0


def test_preview_shows_local_views(make_store, tmp_path):
    from PIL import Image

    from simclr_path.transforms import preview, preview_views

    s = make_store(n=6, size=32, name="a.h5", slide_id="A")
    cfg = AugmentConfig(image_size=24, local_crops=2, local_size=12)
    names, rows = preview_views([s], cfg, n_pairs=3, seed=0)
    assert len(names) == len(rows) == 3
    for row in rows:
        assert [im.shape for im in row] == [(32, 32, 3), (24, 24, 3), (24, 24, 3), (12, 12, 3),
                                            (12, 12, 3)]
        assert all(im.dtype == np.uint8 for im in row)
        assert not np.array_equal(row[3], row[4])  # two different local crops
    again = preview_views([s], cfg, n_pairs=3, seed=0)[1]
    assert all(np.array_equal(a, b) for r1, r2 in zip(rows, again) for a, b in zip(r1, r2))
    # the full-size views do not depend on whether local views are drawn
    plain = preview_views([s], AugmentConfig(image_size=24), n_pairs=3, seed=0)[1]
    assert all(len(r) == 3 for r in plain)
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
               for a, b in zip(rows, plain))
    wide = Image.open(preview([s], tmp_path / "w.png", cfg, n_pairs=3, seed=0))
    narrow = Image.open(preview([s], tmp_path / "n.png", AugmentConfig(image_size=24), n_pairs=3))
    assert wide.width > narrow.width * 1.5 and wide.height == narrow.height


def test_preview_cli_errors(make_store, tmp_path, capsys):
    from simclr_path.cli import main

    s = make_store(n=4, size=16)
    rc = main(["preview", str(s), "--out", str(tmp_path / "p.png"), "--pairs", "2"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "image_size 224 is larger than the stored 16 px" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(SimclrPathError):
        from simclr_path.transforms import preview

        preview([], tmp_path / "q.png")


def test_blur_matches_scipy_and_the_device_path():
    ndimage = pytest.importorskip("scipy.ndimage")
    from simclr_path.transforms import _blur_

    x = to_float(_he_like(n=2, size=20)).contiguous()
    sigma = torch.tensor([0.8, 1.5])
    cpu = gaussian_blur(x, sigma)  # OpenCV path
    generic = _blur_(x.clone().transpose(2, 3).contiguous().transpose(2, 3), sigma)  # torch path
    for i, s in enumerate(sigma.tolist()):
        ref = np.stack([ndimage.gaussian_filter(x[i, c].numpy(), s, mode="mirror", truncate=2.5)
                        for c in range(3)])
        assert np.allclose(cpu[i].numpy(), ref, atol=2e-3)
    assert torch.allclose(cpu, generic, atol=1e-5)


def test_rot90_matches_numpy():
    import albumentations as A

    from simclr_path.transforms import _RandomRotate90

    img = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    t = _RandomRotate90(p=1.0)
    assert isinstance(t, A.RandomRotate90)
    for k in range(4):
        assert np.array_equal(t.apply(img, factor=k), np.rot90(img, k))


def test_cpu_chunks_equal_whole_batch_and_out_buffer():
    cfg = AugmentConfig(image_size=24, stain_p=0.5, color_p=0.5, blur_p=0.5, grayscale_p=0.3)
    v = _he_like(n=8).permute(0, 3, 1, 2).contiguous()
    one = ColorAugment(cfg, cpu_chunk=1)(v, torch.Generator().manual_seed(4))
    whole = ColorAugment(cfg, cpu_chunk=8)(v, torch.Generator().manual_seed(4))
    assert torch.allclose(one, whole, atol=1e-5)
    out = torch.empty(8, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    got = ColorAugment(cfg)(v, torch.Generator().manual_seed(4), out=out)
    assert got is out and torch.allclose(out, one, atol=1e-6)
    with pytest.raises(ValueError):
        ColorAugment(cfg)(v, torch.Generator(), out=torch.empty(2, 3, 24, 24))


def test_scratch_buffers_are_made_once_per_chunk_shape(monkeypatch):
    """A batch that is not a multiple of the chunk (2 x 320 views in chunks of 256 on a GPU)
    ends in a smaller chunk: its buffers are kept beside the full chunk's, not allocated
    again for every call (on CUDA each new allocation can mean a synchronising cudaMalloc)."""
    import simclr_path.transforms as tr

    made = []
    real = tr._Scratch.__init__
    monkeypatch.setattr(tr._Scratch, "__init__", lambda self, b, *a: (made.append(b), real(self, b, *a))[1])
    aug = ColorAugment(AugmentConfig(image_size=24, stain_p=1.0, blur_p=0.5), cpu_chunk=4)
    v = _he_like(n=10).permute(0, 3, 1, 2).contiguous()
    first = aug(v, torch.Generator().manual_seed(1))
    for _ in range(3):
        again = aug(v, torch.Generator().manual_seed(1))
    assert sorted(made) == [2, 4]
    assert torch.equal(first, again)


def test_no_blocking_host_to_device_copy_per_batch(monkeypatch):
    """On a GPU a blocking ``.to`` waits for all queued kernels; the per-sample parameters must
    go over without one. Every host-to-device copy goes through ``_to``, checked on the "meta"
    device (the same code path as CUDA, no GPU), and ``_to`` copies to CUDA without blocking."""
    import sys

    import simclr_path.transforms as tr

    callers = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "meta":
            callers.append(sys._getframe(1).f_code.co_name)
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    cfg = AugmentConfig(image_size=16, stain_p=0.5, color_p=0.5, blur_p=0.5, grayscale_p=0.5)
    views = torch.zeros(8, 3, 16, 16, dtype=torch.uint8, device="meta")
    out = ColorAugment(cfg)(views, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (8, 3, 16, 16)
    assert callers and set(callers) == {"_to"}
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(k) or self)
    tr._to(torch.zeros(3), torch.device("cuda", 0))
    tr._to(torch.zeros(3), torch.device("cpu"), torch.float64)
    assert [c["non_blocking"] for c in calls] == [True, False]


@pytest.mark.parametrize("hue", [0.02, -0.05])
def test_hue_jitter_turns_hue_the_way_torchvision_does(hue):
    """A positive hue factor moves HSV hue up, as torchvision's adjust_hue (the YIQ rotation
    stands in for it: same sense, somewhat larger on H&E colours)."""
    import colorsys

    from torchvision.transforms.v2.functional import adjust_hue

    pinks = torch.tensor([[0.85, 0.55, 0.75], [0.6, 0.3, 0.65], [0.9, 0.7, 0.8]])
    x = pinks.T.reshape(1, 3, 1, 3).contiguous()
    one, h = torch.ones(1), torch.full((1,), hue)
    ours = color_jitter(x, one, one, one, h)[0].reshape(3, 3).T
    ref = adjust_hue(x[0], hue).reshape(3, 3).T

    def dh(a, b):  # signed HSV hue change, wrapped to (-0.5, 0.5]
        d = colorsys.rgb_to_hsv(*b.tolist())[0] - colorsys.rgb_to_hsv(*a.tolist())[0]
        return (d + 0.5) % 1.0 - 0.5

    for p, o, r in zip(pinks, ours, ref):
        assert np.sign(dh(p, o)) == np.sign(dh(p, r)) == np.sign(hue)
        assert 0.5 < dh(p, o) / dh(p, r) < 2.0


def test_preview_refuses_a_negative_seed_in_one_line(make_store, tmp_path):
    from simclr_path.transforms import preview

    with pytest.raises(SimclrPathError, match="preview: seed must be an integer >= 0, got -1"):
        preview([make_store(n=4)], tmp_path / "p.png", seed=-1)
    assert not (tmp_path / "p.png").exists()
