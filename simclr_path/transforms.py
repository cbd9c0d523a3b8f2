"""Two-view SimCLR augmentations for H&E patches, and the evaluation transform.

The work is split where it is cheapest (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", section 3 and appendix A):

* **Geometric** (:class:`GeometricViews`, albumentations, in DataLoader workers, on uint8):
  random resized crop, horizontal and vertical flips, 90-degree rotations. Output: uint8 views,
  so workers ship 4x fewer bytes than float images.
* **Colour** (:class:`ColorAugment`, torch, on the training device, vectorised over the batch
  with per-sample random parameters): stain jitter in HED space after Tellez et al. 2019
  ("Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
  distilled stain-invariant convolutional networks", IEEE TMI) with the Ruifrok & Johnston (2001)
  stain matrix of ``skimage.color.rgb2hed``; brightness / contrast / saturation / hue jitter;
  Gaussian blur; optional grayscale; then ImageNet normalisation. albumentations' per-image
  ``HEStain`` costs ~12 ms per 224 px image here; the batched version costs a small fraction of
  that per image (``benchmarks/bench_loader.py``).

:func:`eval_transform` is the matching deterministic transform for embedding (resize + normalise),
and :func:`preview` draws a grid of augmented view pairs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.config import AugmentConfig
from simclr_path.errors import SimclrPathError

# ImageNet statistics, as timm models expect; shared with simclr_path.embed.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Ruifrok & Johnston (2001) stain vectors, rows = haematoxylin, eosin, DAB, as in
# skimage.color.rgb_from_hed; OD_rgb = stains @ RGB_FROM_HED and stains = OD_rgb @ HED_FROM_RGB.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                            dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

# Optical density floor: intensities are clamped to >= 1/255 before the log (a black pixel has
# finite OD) and pure white has OD 0 exactly, so scaling stain concentrations cannot tint it.
_OD_FLOOR = 1.0 / 255.0
# Stain shifts are weighted by how much stain a pixel holds (mean OD / _TISSUE_OD, capped at 1):
# background glass (OD ~0) is left nearly white instead of being tinted by the additive shift.
_TISSUE_OD = 0.25

# RGB -> YIQ: hue jitter as a rotation of the chroma plane (a linear, batched approximation of the
# HSV hue shift of torchvision's ColorJitter that avoids per-pixel branching).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


# ----------------------------------------------------------------------------------------------
# Geometric part: albumentations on uint8, in DataLoader workers
# ----------------------------------------------------------------------------------------------
class GeometricViews:
    """Random resized crop, flips and 90-degree rotations of one uint8 patch (albumentations).

    ``views(patch, seed)`` maps an (S, S, 3) uint8 patch to two independent (s, s, 3) uint8 views,
    s = ``cfg.image_size``. Results depend only on ``seed``, not on the worker that runs it.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        import albumentations as A
        import cv2

        self.cfg = cfg
        s = int(cfg.image_size)
        self.compose = A.Compose([
            A.RandomResizedCrop(size=(s, s), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0),
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            A.RandomRotate90(p=cfg.rot90),
        ])

    def seed(self, seed: int) -> None:
        """Reseed every transform with its own stream (albumentations gives them all the same
        seed, which would make e.g. horizontal and vertical flips always co-occur)."""
        ss = np.random.SeedSequence(int(seed) % (2**63))
        seeds = ss.generate_state(len(self.compose.transforms) + 1)
        self.compose.set_random_seed(int(seeds[0]))
        for t, sd in zip(self.compose.transforms, seeds[1:]):
            t.set_random_seed(int(sd))

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        """One view of ``patch`` (S, S, 3) uint8 -> (s, s, 3) uint8 (uses the current stream)."""
        return self.compose(image=patch)["image"]

    def views(self, patch: np.ndarray, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Two views of ``patch``; reseeded first when ``seed`` is given."""
        if seed is not None:
            self.seed(seed)
        return self(patch), self(patch)


# ----------------------------------------------------------------------------------------------
# Colour part: batched torch ops on the training device
# ----------------------------------------------------------------------------------------------
def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float32) * (hi - lo) + lo


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float32 (B, 3, H, W) in [0, 1].

    From (B, H, W, 3) the result is a channels-last view, which convolutions prefer.
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def stain_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """HED stain augmentation (Tellez et al. 2019), batched.

    Each pixel's optical density OD = -log(max(rgb, 1/255)) is deconvolved into haematoxylin,
    eosin and DAB concentrations ``c = OD @ HED_FROM_RGB`` (Ruifrok & Johnston 2001); each
    concentration becomes ``alpha * c + beta * w`` with ``w = min(mean OD / 0.25, 1)`` so that
    stain-free background gets no additive tint; the image is recomposed as ``exp(-OD')``. Only
    the change is added back to the original OD, so ``alpha = 1, beta = 0`` is the identity.

    Args:
        x: (B, 3, H, W) float RGB in [0, 1].
        alpha: (B, 3) per-sample, per-stain scale (H, E, D), around 1.
        beta: (B, 3) per-sample, per-stain shift in OD units, around 0.
    Returns:
        (B, 3, H, W) float RGB in [0, 1].
    """
    dev, dt = x.device, x.dtype
    od = -torch.log(x.clamp(min=_OD_FLOOR))  # (B, 3, H, W), white -> 0
    m_in = HED_FROM_RGB.to(dev, dt)  # (rgb, hed)
    m_out = RGB_FROM_HED.to(dev, dt)  # (hed, rgb)
    conc = torch.einsum("bchw,cs->bshw", od, m_in)  # (B, 3 stains, H, W)
    w = (od.mean(dim=1, keepdim=True) / _TISSUE_OD).clamp_(max=1.0)  # (B, 1, H, W)
    a = alpha.to(dev, dt)[:, :, None, None]
    b = beta.to(dev, dt)[:, :, None, None]
    delta = (a - 1.0) * conc + b * w  # change of stain concentrations
    od = od + torch.einsum("bshw,sc->bchw", delta, m_out)
    return torch.exp(-od.clamp_(min=0.0)).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (ITU-R 601)."""
    return torch.einsum("bchw,c->bhw", x, _GRAY.to(x.device, x.dtype)).unsqueeze(1)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (as torchvision's ColorJitter), batched.

    Args:
        x: (B, 3, H, W) float RGB in [0, 1].
        brightness, contrast, saturation: (B,) multiplicative factors (1 = unchanged).
        hue: (B,) hue rotation as a fraction of a full turn (0 = unchanged), applied as a
            rotation of the chroma plane in YIQ space.
    Returns:
        (B, 3, H, W) float RGB in [0, 1].
    """
    dev, dt = x.device, x.dtype

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(dev, dt)[:, None, None, None]

    x = (x * col(brightness)).clamp_(0.0, 1.0)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * col(contrast) + mean).clamp_(0.0, 1.0)
    g = _gray(x)
    x = ((x - g) * col(saturation) + g).clamp_(0.0, 1.0)
    theta = hue.to(torch.float64) * 2.0 * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(hue), 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mats = (_YIQ2RGB.double() @ rot @ _RGB2YIQ.double()).to(dev, dt)  # (B, 3, 3) rgb -> rgb
    return torch.einsum("bij,bjhw->bihw", mats, x).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a different sigma per sample, batched as a grouped conv.

    Args:
        x: (B, 3, H, W) float.
        sigma: (B,) standard deviations in pixels (> 0).
    Returns:
        (B, 3, H, W), reflect-padded so the size is unchanged.
    """
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, K)
    k = k.repeat_interleave(c, dim=0)  # (B*3, K)
    y = x.reshape(1, b * c, h, w)
    pad = max(0, min(radius, h - 1, w - 1))
    if pad < radius:  # tiny images: reflect padding needs pad < size
        k = k[:, radius - pad: radius + pad + 1]
        k = k / k.sum(dim=1, keepdim=True)
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


class ColorAugment:
    """Batched colour, stain, blur and grayscale augmentation of uint8 views on any device.

    ``aug(views, generator)`` maps uint8 (B, H, W, 3) (or (B, 3, H, W)) to float (B, 3, H, W),
    ImageNet-normalised (``normalize=False`` keeps [0, 1]). Each sample draws its own parameters
    and its own Bernoulli decision per operation from ``generator`` (a CPU ``torch.Generator``;
    the same number of draws whatever is applied, so results depend only on its seed).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def params(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample parameters for ``n`` images, identity where an op is not applied."""
        c = self.cfg

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=g) < p

        out: dict[str, torch.Tensor] = {}
        on = coin(c.stain_p)
        alpha = _uniform(g, 3 * n, 1 - c.stain_scale, 1 + c.stain_scale).view(n, 3)
        beta = _uniform(g, 3 * n, -c.stain_shift, c.stain_shift).view(n, 3)
        out["stain_on"] = on
        out["alpha"] = torch.where(on[:, None], alpha, torch.ones_like(alpha))
        out["beta"] = torch.where(on[:, None], beta, torch.zeros_like(beta))
        on = coin(c.color_p)
        out["color_on"] = on
        for name, lo, hi, ident in (
            ("brightness", 1 - c.brightness, 1 + c.brightness, 1.0),
            ("contrast", 1 - c.contrast, 1 + c.contrast, 1.0),
            ("saturation", 1 - c.saturation, 1 + c.saturation, 1.0),
            ("hue", -c.hue, c.hue, 0.0),
        ):
            v = _uniform(g, n, max(lo, 0.0) if ident == 1.0 else lo, hi)
            out[name] = torch.where(on, v, torch.full_like(v, ident))
        out["blur_on"] = coin(c.blur_p)
        out["sigma"] = _uniform(g, n, c.blur_sigma[0], c.blur_sigma[1])
        out["gray_on"] = coin(c.grayscale_p)
        return out

    def __call__(self, views: torch.Tensor, generator: torch.Generator,
                 normalize_output: bool = True) -> torch.Tensor:
        x = to_float(views)
        p = self.params(x.shape[0], generator)
        dev = x.device
        if bool(p["stain_on"].any()):
            idx = p["stain_on"].nonzero().squeeze(1)
            x[idx.to(dev)] = stain_jitter(x[idx.to(dev)], p["alpha"][idx], p["beta"][idx])
        if bool(p["color_on"].any()):
            idx = p["color_on"].nonzero().squeeze(1)
            x[idx.to(dev)] = color_jitter(x[idx.to(dev)], *(p[k][idx] for k in
                                          ("brightness", "contrast", "saturation", "hue")))
        if bool(p["blur_on"].any()):
            idx = p["blur_on"].nonzero().squeeze(1)
            x[idx.to(dev)] = gaussian_blur(x[idx.to(dev)], p["sigma"][idx]).clamp_(0.0, 1.0)
        if bool(p["gray_on"].any()):
            idx = p["gray_on"].nonzero().squeeze(1).to(dev)
            x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
        return normalize(x) if normalize_output else x


def eval_transform(patches: torch.Tensor | np.ndarray, image_size: int,
                   device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
    """Deterministic transform for embedding: uint8 (B, S, S, 3) RGB -> float (B, 3, s, s).

    Resizes the whole patch to ``image_size`` (antialiased bilinear) when S differs -- the views in
    training are random resized crops of the whole patch, whose expected content is the patch
    itself -- and normalises with ImageNet mean/std exactly as the training views are.

    Args:
        patches: uint8 (B, S, S, 3) or (S, S, 3), numpy or torch.
        image_size: output side s (the encoder's ``image_size`` from ``encoder.json``).
        device: where to compute.
        channels_last: return channels-last memory layout.
    """
    x = torch.as_tensor(patches).to(device, non_blocking=True)
    x = to_float(x)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    x = normalize(x)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (for pictures), clamped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x * std + mean).clamp(0.0, 1.0)


def preview(stores: Sequence[str | os.PathLike], out_png: str | os.PathLike,
            cfg: AugmentConfig | None = None, n_pairs: int = 8, seed: int = 0,
            force: bool = True) -> Path:
    """Write a PNG grid of ``n_pairs`` augmented view pairs: original patch, view 1, view 2.

    Patches are drawn at random (seeded) across all ``stores``; the views go through exactly the
    training pipeline (:class:`GeometricViews` then :class:`ColorAugment`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simclr_path.data import open_stores
    from simclr_path.figures import save_figure

    cfg = cfg or AugmentConfig()
    if n_pairs < 1:
        raise SimclrPathError(f"--pairs must be >= 1, got {n_pairs}")
    opened = open_stores(stores, image_size=cfg.image_size)
    sizes = np.array([len(s) for s in opened])
    rng = np.random.default_rng(seed)
    flat = rng.choice(int(sizes.sum()), size=n_pairs, replace=int(sizes.sum()) < n_pairs)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    geo = GeometricViews(cfg)
    colour = ColorAugment(cfg)
    originals, v1, v2, names = [], [], [], []
    for k, f in enumerate(flat):
        si = int(np.searchsorted(offsets, f, side="right") - 1)
        patch = opened[si][int(f - offsets[si])]
        a, b = geo.views(patch, seed=seed * 1_000_003 + k)
        originals.append(patch)
        v1.append(a)
        v2.append(b)
        names.append(f"{opened[si].slide_id} #{int(f - offsets[si])}")
    g = torch.Generator().manual_seed(seed)
    both = torch.from_numpy(np.stack(v1 + v2))
    views = colour(both, g, normalize_output=False).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(n_pairs, 3, figsize=(3 * 2.0, n_pairs * 2.0 + 0.6), squeeze=False)
    for r in range(n_pairs):
        for c, (img, title) in enumerate(((originals[r], f"patch {names[r]}"),
                                          (views[r], "view 1"), (views[n_pairs + r], "view 2"))):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
    fig.suptitle(f"SimCLR augmented view pairs ({cfg.image_size} px views)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png, force=force)
