"""SimCLR augmentations for H&E patches (two views, optional multi-crop local views), and the
evaluation transform.

The work is split where it is cheapest (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", section 3 and appendix A):

* **Geometric** (:class:`GeometricViews`, albumentations, in DataLoader workers, on uint8):
  random resized crop, horizontal and vertical flips, 90-degree rotations. Output: uint8 views,
  so workers ship 4x fewer bytes than float images.
* **Colour** (:class:`ColorAugment`, torch, on the training device, vectorised over the batch
  with per-sample random parameters): stain jitter in HED space after Tellez et al. 2018
  ("Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
  distilled stain-invariant convolutional networks", IEEE TMI 37(9)) and Tellez et al. 2019
  ("Quantifying the effects of data augmentation and stain color normalization in
  convolutional neural networks for computational pathology", Medical Image Analysis 58) with the Ruifrok & Johnston (2001)
  stain matrix of ``skimage.color.rgb2hed``; brightness / contrast / saturation / hue jitter;
  Gaussian blur; optional grayscale; then ImageNet normalisation. albumentations' per-image
  ``HEStain`` costs ~12 ms per 224 px image here; the batched version costs a small fraction of
  that per image (``benchmarks/bench_loader.py``).

:func:`eval_transform` is the matching deterministic transform for embedding (resize + normalise),
and :func:`preview` draws a grid of augmented view pairs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simclr_path.config import PREVIEW_PAIRS, AugmentConfig, section_cfg
from simclr_path.errors import SimclrPathError, check_int

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
_LN2 = math.log(2.0)

# RGB -> YIQ: hue jitter as a rotation of the chroma plane (a linear, batched approximation of the
# HSV hue shift of torchvision's ColorJitter that avoids per-pixel branching).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device``. Host-to-GPU copies of the small per-sample parameters are
    non-blocking: a blocking ``.to`` waits for every kernel queued before it, so ten of them per
    batch would keep the CPU from running ahead of the GPU. (Safe from pageable memory: CUDA
    stages the data before the call returns.)"""
    return t.to(device, dtype=dtype, non_blocking=t.device.type == "cpu" and device.type == "cuda")


@functools.cache
def _device_constants(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Luma weights (3,) and ImageNet mean, 1 / std (1, 3, 1, 1), made once per device."""
    with torch.inference_mode(False):  # cached: usable later with autograd even if first made in inference mode
        return {"gray": _to(_GRAY, device, dtype),
                "mean": _to(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), device, dtype),
                "inv_std": _to((1.0 / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1), device, dtype)}


# ----------------------------------------------------------------------------------------------
# Geometric part: albumentations on uint8, in DataLoader workers
# ----------------------------------------------------------------------------------------------
def _rotate90_class():
    import albumentations as A
    import cv2

    # np.rot90 by k quarter turns counter-clockwise, as albumentations does it
    codes = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}

    class RandomRotate90(A.RandomRotate90):
        """albumentations' RandomRotate90 with cv2.rotate for images (10x faster than np.rot90's
        strided copy of a 3-channel image; identical output)."""

        def apply(self, img: np.ndarray, factor: int, **params) -> np.ndarray:
            k = int(factor) % 4
            return img if k == 0 else cv2.rotate(img, codes[k])

    return RandomRotate90


def _RandomRotate90(p: float):  # reads like the albumentations class it builds
    return _rotate90_class()(p=p)


class GeometricViews:
    """Random resized crop, flips and 90-degree rotations of one uint8 patch (albumentations).

    ``views(patch, seed)`` maps an (S, S, 3) uint8 patch to two independent (s, s, 3) uint8 views,
    s = ``cfg.image_size``. Results depend only on ``seed``, not on the worker that runs it.
    ``local=True`` makes the small views of multi-crop instead (Caron et al. 2020): side
    ``cfg.local_view_size``, crop area ``cfg.local_crop_scale``, the same flips and rotations.
    """

    def __init__(self, cfg: AugmentConfig, local: bool = False) -> None:
        import albumentations as A
        import cv2

        self.cfg = cfg
        s = cfg.local_view_size if local else int(cfg.image_size)
        scale = tuple(cfg.local_crop_scale if local else cfg.crop_scale)
        self.compose = A.Compose([
            A.RandomResizedCrop(size=(s, s), scale=scale, ratio=tuple(cfg.crop_ratio),
                                interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0),
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            _RandomRotate90(p=cfg.rot90),
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


# The batched ops below work on planar float images (b, 3, H, W), in place where possible and
# with caller-provided scratch buffers (``_Scratch``): on a CPU, a fresh multi-megabyte tensor
# per op costs more in page faults than the arithmetic, and one 224 px image (600 KB) with its
# scratch stays in cache. Every per-pixel colour transform of a sample is one 3x3 matrix
# product over its pixels (torch.bmm), so the work is the same for any batch size.
class _Scratch:
    """Reusable buffers for a (b, 3, H, W) float32 batch on one device."""

    def __init__(self, b: int, h: int, w: int, device: torch.device) -> None:
        self.shape = (b, h, w, device)
        self.x = torch.empty(b, 3, h, w, device=device)
        self.od = torch.empty(b, 3, h, w, device=device)
        self.w = torch.empty(b, 1, h, w, device=device)
        self.pad: torch.Tensor | None = None

    def padded(self, h: int, w: int) -> torch.Tensor:
        b = self.shape[0]
        if self.pad is None or self.pad.shape[2:] != (h, w):
            self.pad = torch.empty(b, 3, h, w, device=self.x.device)
        return self.pad


def stain_matrices(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample HED jitter as an affine map of optical densities: ``od' = A od + w c``.

    With stain concentrations ``s = od @ HED_FROM_RGB`` (Ruifrok & Johnston 2001; row vectors as in
    skimage), Tellez et al.'s ``s' = alpha * s + beta`` recomposed as ``od' = s' @ RGB_FROM_HED``
    gives ``od' = od (I + HED_FROM_RGB diag(alpha - 1) RGB_FROM_HED) + beta @ RGB_FROM_HED``.
    alpha, beta: (n, 3) -> A (n, 3, 3) acting on column vectors, c (n, 3, 1).
    """
    a = alpha.double() - 1.0
    rows = torch.eye(3, dtype=torch.float64) + HED_FROM_RGB[None] @ (a[:, :, None] * RGB_FROM_HED[None])
    shift = (beta.double() @ RGB_FROM_HED)[:, :, None]
    return rows.transpose(1, 2).float().contiguous(), shift.float().contiguous()


def _log2_(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.is_contiguous() and out.is_contiguous():
        np.log2(x.numpy(), out=out.numpy())  # numpy's SIMD log2: ~3.5x torch's CPU kernel here
        return out
    return torch.log2(x, out=out)


def _exp2_(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.is_contiguous():
        np.exp2(x.numpy(), out=x.numpy())
        return x
    return x.exp2_()


def _stain_(x: torch.Tensor, mats: torch.Tensor, shift: torch.Tensor, od: torch.Tensor,
            w: torch.Tensor) -> torch.Tensor:
    """Stain jitter of x (b, 3, H, W) in [0, 1], in place; od (b, 3, H, W) and w (b, 1, H, W) are
    scratch. Optical densities are kept in base 2 (exp2 is the cheaper exponential; the maps
    are linear, so only the shift and the tissue threshold change units)."""
    b = x.shape[0]
    _log2_(torch.clamp(x, min=_OD_FLOOR, out=od), od).neg_()  # white -> OD 0
    # stain-free background gets no additive tint: the shift is weighted by how much stain a
    # pixel holds (mean OD / _TISSUE_OD, capped at 1)
    torch.sum(od, dim=1, keepdim=True, out=w).mul_(_LN2 / (3.0 * _TISSUE_OD)).clamp_(max=1.0)
    xv = x.view(b, 3, -1)
    torch.bmm(_to(mats, x.device), od.view(b, 3, -1), out=xv)
    xv.addcmul_(_to(shift, x.device), w.view(b, 1, -1), value=1.0 / _LN2)
    return _exp2_(x.clamp_(min=0.0).neg_())


def stain_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """HED stain augmentation (Tellez et al. 2018, 2019), batched.

    Each pixel's optical density OD = -log(max(rgb, 1/255)) is deconvolved into haematoxylin,
    eosin and DAB concentrations ``c = OD @ HED_FROM_RGB`` (Ruifrok & Johnston 2001); each
    concentration becomes ``alpha * c + beta * w`` with ``w = min(mean OD / 0.25, 1)`` so that
    stain-free background gets no additive tint; the image is recomposed as ``exp(-OD')``. Only
    the change is added back to the original OD, so ``alpha = 1, beta = 0`` is the identity but
    for the floor: samples below 1/255 (uint8 0) come back as 1/255.

    Args:
        x: (B, 3, H, W) float RGB in [0, 1].
        alpha: (B, 3) per-sample, per-stain scale (H, E, D), around 1.
        beta: (B, 3) per-sample, per-stain shift in OD units, around 0.
    Returns:
        (B, 3, H, W) float RGB in [0, 1].
    """
    mats, shift = stain_matrices(alpha, beta)
    x = x.float().contiguous().clone()
    return _stain_(x, mats, shift, torch.empty_like(x), torch.empty_like(x[:, :1]))


def color_linear(brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast, saturation and hue jitter as one affine map per sample.

    torchvision's ColorJitter order (brightness b, contrast c, saturation s, hue h) without the
    clamps between steps: ``y = c b H S x + (1 - c) b m`` where m is the mean luma of x, S mixes
    each pixel with its luma, and H rotates the chroma plane of YIQ by h turns (a linear stand-in
    for the HSV hue shift: the same direction; on saturated H&E pixels of real tiles about 0.85x
    its size on average, 0.67-1.34x per pixel, measured against torchvision's adjust_hue). S and
    H both keep grey grey, which makes the composition affine.
    Returns M (n, 3, 3) = ``c b H S`` and k (n,) = ``(1 - c) b``; the shift is ``k m``.
    """
    n = len(brightness)
    gray = _GRAY.double()
    b, c, s = brightness.double(), contrast.double(), saturation.double()
    eye = torch.eye(3, dtype=torch.float64)
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * torch.ones(3, 1, dtype=torch.float64) * gray
    theta = hue.double() * 2.0 * math.pi
    rot = torch.zeros(n, 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    # this sense turns HSV hue the way torchvision's adjust_hue does (the other one reversed it)
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(theta), torch.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = -torch.sin(theta), torch.cos(theta)
    hmat = _YIQ2RGB.double() @ rot @ _RGB2YIQ.double()
    mats = (c * b)[:, None, None] * (hmat @ sat)
    return mats.float().contiguous(), ((1 - c) * b).float()


def _mean_luma(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) -> (b,) mean luma, from every 4th row and column (the contrast anchor)."""
    sub = x[:, :, ::4, ::4]
    return torch.einsum("bchw,c->b", sub, _device_constants(x.device, x.dtype)["gray"]) / sub[0, 0].numel()


def _color(x: torch.Tensor, mats: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """y = M x + d, clamped to [0, 1], written to ``out`` (b, 3, H, W)."""
    b = x.shape[0]
    torch.baddbmm(_to(shift, x.device), _to(mats, x.device), x.view(b, 3, -1), out=out.view(b, 3, -1))
    return out.clamp_(0.0, 1.0)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (see :func:`color_linear`), batched.

    Args:
        x: (B, 3, H, W) float RGB in [0, 1].
        brightness, contrast, saturation: (B,) multiplicative factors (1 = unchanged).
        hue: (B,) hue rotation as a fraction of a full turn (0 = unchanged).
    Returns:
        (B, 3, H, W) float RGB in [0, 1].
    """
    x = x.float().contiguous()
    mats, k = color_linear(brightness, contrast, saturation, hue)
    shift = (_to(k, x.device) * _mean_luma(x))[:, None, None].expand(-1, 3, 1)
    return _color(x, mats, shift, torch.empty_like(x))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (ITU-R 601)."""
    return torch.einsum("bchw,c->bhw", x, _device_constants(x.device, x.dtype)["gray"]).unsqueeze(1)


def _kernels(sigma: torch.Tensor, h: int, w: int, sigma_max: float | None = None
             ) -> tuple[torch.Tensor, int]:
    """Per-sample 1-D Gaussian taps (b, 2r + 1), radius r = ceil(2.5 sigma_max) (at most the
    image size - 1, as reflect padding needs); sigma_max defaults to the largest sigma."""
    r = max(1, math.ceil(2.5 * float(sigma.max() if sigma_max is None else sigma_max)))
    r = max(0, min(r, h - 1, w - 1))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma.float().clamp(min=1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True), r


def _blur_(x: torch.Tensor, sigma: torch.Tensor, scratch: _Scratch | None = None,
           sigma_max: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of x (b, 3, H, W) in place, a different sigma per sample (reflect
    padding). CPU: OpenCV's separable filter per plane (~4x torch's CPU convolutions here); other
    devices: sums of shifted copies weighted per sample, the whole batch at once."""
    b, _, h, w = x.shape
    k, r = _kernels(sigma, h, w, sigma_max)
    if r == 0:
        return x
    if x.device.type == "cpu" and x.is_contiguous():
        import cv2

        xn = x.numpy()
        for i in range(b):
            ki = k[i].numpy()
            for c in range(3):
                cv2.sepFilter2D(xn[i, c], -1, ki, ki, dst=xn[i, c], borderType=cv2.BORDER_REFLECT_101)
        return x
    k = _to(k, x.device)
    pad = scratch.padded(h + 2 * r, w) if scratch is not None else x.new_empty(b, 3, h + 2 * r, w)
    pad[:, :, r:r + h] = x
    for i in range(1, r + 1):  # reflect rows: pad row r - i mirrors image row i
        pad[:, :, r - i] = x[:, :, i]
        pad[:, :, r + h - 1 + i] = x[:, :, h - 1 - i]
    torch.mul(pad[:, :, 0:h], k[:, 0].view(b, 1, 1, 1), out=x)
    for t in range(1, 2 * r + 1):
        x.addcmul_(pad[:, :, t:t + h], k[:, t].view(b, 1, 1, 1))
    pad = scratch.padded(h, w + 2 * r) if scratch is not None else x.new_empty(b, 3, h, w + 2 * r)
    pad[:, :, :, r:r + w] = x
    for i in range(1, r + 1):
        pad[:, :, :, r - i] = x[:, :, :, i]
        pad[:, :, :, r + w - 1 + i] = x[:, :, :, w - 1 - i]
    torch.mul(pad[:, :, :, 0:w], k[:, 0].view(b, 1, 1, 1), out=x)
    for t in range(1, 2 * r + 1):
        x.addcmul_(pad[:, :, :, t:t + w], k[:, t].view(b, 1, 1, 1))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a different sigma per sample (truncated at 2.5 sigma).

    Args:
        x: (B, 3, H, W) float.
        sigma: (B,) standard deviations in pixels (> 0).
    Returns:
        (B, 3, H, W), reflect-padded so the size is unchanged.
    """
    return _blur_(x.float().contiguous().clone(), sigma)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    const = _device_constants(x.device, x.dtype)
    return (x - const["mean"]) * const["inv_std"]  # as ColorAugment normalises training views


class ColorAugment:
    """Batched colour, stain, blur and grayscale augmentation of uint8 views on any device.

    ``aug(views, generator)`` maps uint8 views, (B, 3, H, W) or (B, H, W, 3), to float32
    (B, 3, H, W), ImageNet-normalised (``normalize_output=False`` keeps [0, 1]). Each sample draws
    its own parameters and its own Bernoulli decision per operation from ``generator`` (a CPU
    ``torch.Generator``; the same number of draws whatever is applied, so results depend only on
    its seed). Order as in SimCLR: stain jitter, colour jitter, blur, grayscale.

    On CUDA up to ``cuda_chunk`` views go through each op at once. On CPU samples go through in chunks of
    ``cpu_chunk`` (default 1) with reused scratch buffers that stay in cache: the same vectorised
    ops, about 3x faster there than whole-batch tensors (``benchmarks/bench_loader.py``).
    """

    def __init__(self, cfg: AugmentConfig, cpu_chunk: int = 1, cuda_chunk: int = 256) -> None:
        self.cfg = cfg
        self.cpu_chunk = int(cpu_chunk)
        self.cuda_chunk = int(cuda_chunk)
        # one set of buffers per chunk shape: a batch that is not a multiple of the chunk
        # ends in a smaller chunk, and one shared set would be reallocated twice a call
        self._scratch: dict[tuple, _Scratch] = {}

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
            ("brightness", max(0.0, 1 - c.brightness), 1 + c.brightness, 1.0),
            ("contrast", max(0.0, 1 - c.contrast), 1 + c.contrast, 1.0),
            ("saturation", max(0.0, 1 - c.saturation), 1 + c.saturation, 1.0),
            ("hue", -c.hue, c.hue, 0.0),
        ):
            v = _uniform(g, n, lo, hi)
            out[name] = torch.where(on, v, torch.full_like(v, ident))
        out["blur_on"] = coin(c.blur_p)
        out["sigma"] = _uniform(g, n, c.blur_sigma[0], c.blur_sigma[1])
        out["gray_on"] = coin(c.grayscale_p)
        return out

    def _scratch_for(self, b: int, h: int, w: int, device: torch.device) -> _Scratch:
        key = (b, h, w, device)
        if key not in self._scratch:
            if len(self._scratch) >= 4:  # shapes changed (another view size): drop the oldest
                del self._scratch[next(iter(self._scratch))]
            self._scratch[key] = _Scratch(b, h, w, device)
        return self._scratch[key]

    def __call__(self, views: torch.Tensor, generator: torch.Generator,
                 normalize_output: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """Augment ``views``; ``out`` (float32 (B, 3, H, W), any memory format, e.g. channels-last
        for the model) receives the result when given -- reusing one buffer across steps saves
        the page faults of a fresh batch-sized tensor."""
        if views.ndim == 3:
            views = views.unsqueeze(0)
        if views.shape[1] != 3 and views.shape[-1] == 3:
            views = views.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W) view
        n, _, h, w = views.shape
        dev = views.device
        p = self.params(n, generator)
        p["stain_m"], p["stain_c"] = stain_matrices(p["alpha"], p["beta"])
        p["color_m"], p["color_k"] = color_linear(p["brightness"], p["contrast"], p["saturation"],
                                                  p["hue"])
        if out is None:
            out = torch.empty(n, 3, h, w, device=dev, dtype=torch.float32)
        elif out.shape != (n, 3, h, w) or out.dtype != torch.float32 or out.device != dev:
            raise ValueError(f"out must be float32 {(n, 3, h, w)} on {dev}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        const = _device_constants(dev, torch.float32)
        mean, inv_std = const["mean"], const["inv_std"]
        step = self.cuda_chunk if dev.type == "cuda" else max(1, self.cpu_chunk)
        scale = 1.0 / 255.0 if views.dtype == torch.uint8 else 1.0
        for lo in range(0, n, step):
            sl = slice(lo, min(n, lo + step))
            b = sl.stop - sl.start
            sc = self._scratch_for(b, h, w, dev)
            x = sc.x
            x.copy_(views[sl]).mul_(scale)
            x = self._apply(x, sc, p, sl)
            if normalize_output:
                torch.sub(x, mean, out=out[sl]).mul_(inv_std)
            else:
                out[sl] = x
        return out

    @staticmethod
    def _subset(on: torch.Tensor) -> torch.Tensor | None:
        """None when every sample is selected, else the selected indices."""
        return None if bool(on.all()) else on.nonzero().squeeze(1)

    def _apply(self, x: torch.Tensor, sc: _Scratch, p: dict[str, torch.Tensor], sl: slice) -> torch.Tensor:
        """Stain, colour, blur, grayscale on the chunk x (b, 3, H, W); returns the result tensor."""
        dev = x.device
        stain_m, stain_c = p["stain_m"][sl], p["stain_c"][sl]
        on = p["stain_on"][sl]
        if bool(on.any()):
            idx = self._subset(on)
            if idx is None:
                _stain_(x, stain_m, stain_c, sc.od, sc.w)
            else:
                idx_d = _to(idx, dev)
                sub = x[idx_d]
                x[idx_d] = _stain_(sub, stain_m[idx], stain_c[idx], torch.empty_like(sub),
                                         torch.empty_like(sub[:, :1]))
        on = p["color_on"][sl]
        if bool(on.any()):
            # unselected samples have identity parameters: M = I, shift = 0
            shift = (_to(p["color_k"][sl], dev) * _mean_luma(x))[:, None, None].expand(-1, 3, 1)
            x = _color(x, p["color_m"][sl], shift, sc.od)
        on = p["blur_on"][sl]
        if bool(on.any()):
            idx = self._subset(on)
            smax = self.cfg.blur_sigma[1]  # the same taps whatever the chunking
            if idx is None:
                _blur_(x, p["sigma"][sl], sc, smax)
            else:
                idx_d = _to(idx, dev)
                x[idx_d] = _blur_(x[idx_d], p["sigma"][sl][idx], None, smax)
            x.clamp_(0.0, 1.0)
        on = p["gray_on"][sl]
        if bool(on.any()):
            idx = _to(on.nonzero().squeeze(1), dev)
            x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
        return x


def eval_transform(patches: torch.Tensor | np.ndarray, image_size: int,
                   device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
    """Deterministic transform for embedding: uint8 (B, S, S, 3) RGB -> float (B, 3, s, s).

    Resizes the whole patch to ``image_size`` (antialiased bilinear) when S differs -- the views in
    training are random resized crops of the whole patch, whose expected content is the patch
    itself -- and normalises with ImageNet mean/std exactly as the training views are.

    Args:
        patches: uint8 (B, S, S, 3) or (S, S, 3), numpy or torch.
        image_size: output side s: what ``simclr-path embed`` uses,
            ``simclr_path.embed.default_image_size(encoder_info, store)`` (not ``encoder.json``'s
            training ``image_size``), or an embedding file's ``image_size`` attribute.
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


def preview_views(stores: Sequence[str | os.PathLike], cfg: AugmentConfig | None = None,
                  n_pairs: int = PREVIEW_PAIRS, seed: int = 0) -> tuple[list[str], list[list[np.ndarray]]]:
    """The images of :func:`preview`: ``(row names, rows)``, one row per sampled patch.

    Row ``r`` is ``[patch (S, S, 3), view 1 (s, s, 3), view 2 (s, s, 3), local 1 (l, l, 3), ...]``,
    uint8, with ``cfg.local_crops`` local views of side ``cfg.local_view_size`` (multi-crop) after
    the two full-size views. Patches are drawn at random (seeded) across all ``stores``; the views
    go through the training pipeline (:class:`GeometricViews`, local ones included, then
    :class:`ColorAugment`).
    """
    from simclr_path.data import open_stores

    cfg = section_cfg(cfg, AugmentConfig, "preview")
    if n_pairs < 1:
        raise SimclrPathError(f"--pairs must be >= 1, got {n_pairs}")
    opened = open_stores(stores, image_size=cfg.image_size)
    sizes = np.array([len(s) for s in opened])
    rng = np.random.default_rng(seed)
    flat = rng.choice(int(sizes.sum()), size=n_pairs, replace=int(sizes.sum()) < n_pairs)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    geo = GeometricViews(cfg)
    geo_local = GeometricViews(cfg, local=True) if cfg.local_crops else None
    originals, v1, v2, local, names = [], [], [], [], []
    for k, f in enumerate(flat):
        si = int(np.searchsorted(offsets, f, side="right") - 1)
        patch = opened[si][int(f - offsets[si])]
        a, b = geo.views(patch, seed=seed * 1_000_003 + k)
        originals.append(patch)
        v1.append(a)
        v2.append(b)
        if geo_local is not None:
            geo_local.seed(int(np.random.SeedSequence([seed, k, 17]).generate_state(1)[0]))
            local += [geo_local(patch) for _ in range(cfg.local_crops)]
        names.append(f"{opened[si].slide_id} #{int(f - offsets[si])}")
    g = torch.Generator().manual_seed(seed)
    both = torch.from_numpy(np.stack(v1 + v2))
    views = _colour_u8(ColorAugment(cfg), both, g)
    lv = _colour_u8(ColorAugment(cfg), torch.from_numpy(np.stack(local)), g) if local else None
    k = cfg.local_crops
    rows = [[originals[r], views[r], views[n_pairs + r], *(lv[r * k:(r + 1) * k] if k else [])]
            for r in range(n_pairs)]
    return names, rows


def _colour_u8(colour: ColorAugment, views: torch.Tensor, g: torch.Generator) -> np.ndarray:
    """(B, s, s, 3) uint8 views -> the same views colour-augmented, (B, s, s, 3) uint8 (to show)."""
    x = colour(views, g, normalize_output=False).permute(0, 2, 3, 1).numpy()
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def preview(stores: Sequence[str | os.PathLike], out_png: str | os.PathLike,
            cfg: AugmentConfig | None = None, n_pairs: int = PREVIEW_PAIRS, seed: int = 0,
            force: bool = False, run_name: str | None = None) -> Path:
    """Write a PNG grid of ``n_pairs`` augmented view pairs: original patch, view 1, view 2, and
    with multi-crop (``cfg.local_crops`` > 0) the local views of the same patch
    (:func:`preview_views`); ``run_name`` names the run in the title."""
    from simclr_path.figures import (
        check_figure_outputs,
        new_figure,
        save_figure,
        shorten,
        with_run,
    )

    check_figure_outputs({"out_png": out_png}, {"stores": stores}, force)
    seed = check_int(seed, "preview", "seed")
    import matplotlib

    from simclr_path.budget import describe

    cfg = section_cfg(cfg, AugmentConfig, "preview")
    names, rows = preview_views(stores, cfg, n_pairs, seed)
    n_cols = len(rows[0])
    with matplotlib.rc_context({"text.parse_math": False}):  # slide ids are text, '$' too
        fig, axes = new_figure(n_pairs, n_cols, figsize=(n_cols * 2.0, n_pairs * 2.0 + 0.6),
                               squeeze=False, layout="constrained")  # room for the suptitle
        _draw_preview(fig, axes, rows, [shorten(n, 18) for n in names],
                      with_run(f"SimCLR augmented views ({describe(cfg)})", run_name))
    return save_figure(fig, out_png, force=force)


def _draw_preview(fig, axes, rows: list, names: list[str], title: str) -> None:
    """The preview grid's pictures and titles (one row per patch)."""
    n_cols = len(rows[0])
    titles = ["view 1", "view 2"] + [f"local {j + 1}" for j in range(n_cols - 3)]
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            # 10 pt: the report shows the grid at page width, where 7 pt was about 4; a long
            # slide id (TCGA's 60 characters) is shortened in the middle so it stays in its column
            ax.set_title(f"patch {names[r]}" if c == 0 else f"{titles[c - 1]} ({img.shape[0]} px)",
                         fontsize=10)
    fig.suptitle(title, fontsize=13)
