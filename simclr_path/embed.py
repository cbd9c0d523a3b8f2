"""Patch embeddings: run a trained encoder over every patch of a store (``simclr-path embed``).

Throughput comes from batching (one contiguous HDF5 slice per batch, read by DataLoader workers),
``torch.inference_mode``, channels-last memory layout, bf16 autocast on GPUs that support it, and
resizing/normalising whole batches as tensors on the device instead of patch by patch with PIL.

Feature layers (``EmbedConfig.layer``):

* ``pooled``: the backbone output, (N, num_features), what SimCLR's linear evaluation uses
  (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").
* ``stageN``: global-average-pooled output of feature stage N as timm numbers them
  (``model.feature_info``; for ResNets 0 = stem, 1-4 = layer1-layer4), via timm's generic
  ``forward_intermediates``; for layer-wise linear evaluation.
* ``head``: the SimCLR projection-head output, when the run directory has the head.

With ``EmbedConfig.tta`` each patch's features are the mean over its 8 rotations and flips
(:func:`dihedral_views`), at 8 times the compute.

Input size (``EmbedConfig.image_size``): by default a SimCLR encoder sees each whole patch at
:func:`fixres_size` of its training size, not at the training size itself, because random
resized crops magnify the tissue during training (FixRes: Touvron et al. 2019).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simclr_path.config import EmbedConfig, section_cfg
from simclr_path.data import cv2_fork_safe, one_thread_worker
from simclr_path.errors import SimclrPathError, need_file
from simclr_path.model import encoder_info, load_encoder
from simclr_path.outputs import (
    check_apart,
    check_can_write,
    check_hdf5_name,
    raise_pending_signal,
)
from simclr_path.store import (
    BAD_FEATURES,
    PatchStore,
    check_replaces_kind,
    unusable_rows,
    write_embeddings,
)

# ImageNet statistics, as timm models expect (and as the SimCLR views are normalised).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STAGE = re.compile(r"stage(\d+)")


def fixres_size(train_size: int, crop_scale: Sequence[float] | None, patch_size: int,
                multiple: int = 8, side_ratio: float | None = None,
                train_patch_size: int | None = None) -> int:
    """Input size at which whole patches show tissue at the scale the encoder trained on.

    A RandomResizedCrop view covers an area fraction ``s ~ U(a, b)`` of the patch, i.e. a side
    fraction ``sqrt(s)``, resized to ``train_size``: the tissue looks ``1 / sqrt(s)`` times
    larger than in the whole patch resized to ``train_size``. Matching the mean magnification
    gives ``train_size / E[sqrt(s)]``, with ``E[sqrt(s)] = 2/3 (b^1.5 - a^1.5) / (b - a)``
    (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). For crop scale
    0.2-1.0 that is 1.32x: 96 -> 128 px. (The area is taken as uniform on ``[a, b]``; the crop's
    aspect-ratio retries make small areas a little more likely, E[sqrt(s)] 0.72 rather than 0.76
    for 0.2-1.0, about 5 % more pixels: embedding at 168, 176 or 184 px was level, study 22.)
    ``side_ratio``: the physical side (pixels x mpp) of the patches embedded over that of the
    training patches, where both are known; patches that hold more or less tissue need a
    proportionally larger or smaller input, scaled from the size the training patches
    (``train_patch_size`` px, where known) get themselves, their own limits below applied
    (at a ratio of 1 too when the pixel counts differ: the same tissue in twice the pixels):
    then the tissue keeps the scale of their embeddings, on which a classifier was trained
    (64 px training patches are embedded at 64, not 88, so patches of 1.75x their side at 112,
    not 144). Rounded to ``multiple``; never above ``patch_size`` (no upsampling past the stored pixels) nor, at
    ratio 1 (or unknown), below ``train_size``, which wins where the two conflict (patches
    smaller than the training views, which were enlarged in training too). Without a crop scale (an encoder from an older
    version, or fine-tuned on whole patches) the training size is returned, scaled the same way.
    """
    size = float(train_size)
    if crop_scale:
        a, b = float(crop_scale[0]), float(crop_scale[1])
        size /= math.sqrt(a) if b - a < 1e-9 else 2.0 / 3.0 * (b ** 1.5 - a ** 1.5) / (b - a)
    rescaled = side_ratio is not None and abs(side_ratio - 1.0) > 1e-3
    if side_ratio is not None and train_patch_size is not None and (
            rescaled or train_patch_size != patch_size):
        # the same tissue in more (or fewer) pixels gets the training patches' own size too:
        # their cap applies, or a ratio of 1.000 would embed 128 px patches at 88, not 64
        size = fixres_size(train_size, crop_scale, train_patch_size, multiple) * side_ratio
    elif rescaled:
        size *= side_ratio
    elif not crop_scale:
        return int(train_size)
    size = multiple * round(size / multiple)
    floor = multiple if rescaled else train_size
    return int(max(floor, min(size, patch_size)))


def tissue_scale_mismatch(info: dict[str, Any], store, image_size: int) -> str | None:
    """Why whole patches of ``store`` resized to ``image_size`` show tissue at a scale the
    encoder never saw in training, or None when they do not (or the scale is unknown: imported
    tiles have no mpp).

    Its views of crop area ``s`` in ``[a, b]`` showed the training patches' tissue at every size
    from ``train_size / sqrt(b)`` to ``train_size / sqrt(a)`` (for whole patches of this store:
    times :func:`side_ratio`); a size inside that range, with 10 % or 8 px of slack, is fine.
    :func:`fixres_size` aims at the mean of the range.
    """
    enc_mpp, store_mpp = info.get("mpp"), store.mpp
    if not (enc_mpp and store_mpp):
        return None
    ratio = side_ratio(info, store)
    if not info.get("image_size") or ratio is None:  # no training size: compare mpp alone
        if abs(float(enc_mpp) - float(store_mpp)) <= 0.1 * float(enc_mpp):
            return None
        return (f"patches are at {store_mpp:g} um/px but the encoder was trained at "
                f"{float(enc_mpp):g} um/px")
    train = int(info["image_size"])
    a, b = (float(v) for v in (info.get("crop_scale") or (1.0, 1.0)))
    lo, hi = train * ratio / math.sqrt(b), train * ratio / math.sqrt(a)
    if lo - max(0.1 * lo, 8.0) <= image_size <= hi + max(0.1 * hi, 8.0):
        return None
    seen = f"{lo:.0f} px" if hi - lo < 1 else f"{lo:.0f}-{hi:.0f} px"
    why = (f"at {image_size} px its {store.patch_size} px patches at {store_mpp:g} um/px show "
           f"tissue {'smaller' if image_size < lo else 'larger'} than in any training view "
           f"({info['patch_size']} px patches at {float(enc_mpp):g} um/px seen at {train} px "
           f"with crop scale {a:g}-{b:g}: {seen} for these patches)")
    if image_size < lo and lo > store.patch_size:  # the patches hold too few pixels
        return (f"{why}: more than the {store.patch_size} stored pixels; tile at "
                f"--mpp {store_mpp * store.patch_size / lo:.2g} or finer")
    return why


def side_ratio(info: dict[str, Any], store) -> float | None:
    """Physical side of ``store``'s patches over the encoder's training patches (``encoder.json``
    ``patch_size`` and ``mpp``), or None where either is unknown (imported tiles have no mpp)."""
    p, m = info.get("patch_size"), info.get("mpp")
    if not (p and m and store.mpp):
        return None
    return float(store.patch_size) * float(store.mpp) / (float(p) * float(m))


def default_image_size(info: dict[str, Any], store) -> int:
    """Input size for whole patches of ``store`` when none is set: :func:`fixres_size` of the
    encoder's training size (``encoder.json`` ``info``), or the stored patch size for an encoder
    that records none. ``embed`` and ``finetune`` both use it, so the probe and fine-tuning see
    the tissue at one scale."""
    if info.get("image_size"):
        return fixres_size(int(info["image_size"]), info.get("crop_scale"), store.patch_size,
                           side_ratio=side_ratio(info, store),
                           train_patch_size=int(info["patch_size"]) if info.get("patch_size")
                           else None)
    return int(store.patch_size)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations and reflections (dihedral group D4) of a batch (B, C, H, W), identity first.

    Tissue has no canonical orientation, so averaging an encoder's features over these views
    (test-time augmentation) gives orientation-invariant features.
    """
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3)) if k else x
        views += [r, r.flip(3)]
    return views


@functools.lru_cache(maxsize=8)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std, (1, 3, 1, 1) each, made once per device: a new tensor per batch
    is a host-to-GPU copy that makes the CPU wait for the GPU at every batch."""
    with torch.inference_mode(False):  # first made under embed's inference mode, maybe: such
        # tensors could never take part in a graph (a saliency map's preprocess) afterwards
        return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def preprocess(
    patches: torch.Tensor,
    image_size: int,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Evaluation transform of a batch: uint8 (B, S, S, 3) RGB -> float (B, 3, size, size).

    Resizes with antialiased bilinear interpolation when ``S != image_size`` and normalises with
    ImageNet mean/std. Works on whole batches on ``device`` (the one eval transform of the package).
    """
    x = patches.to(device, non_blocking=True)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean, std = _normalisation(x.device)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _to_host(z: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying a batch's features (B, D) to the host: on a GPU into pinned memory without
    blocking, with an event that marks the copy done (queued right after the batch's own
    kernels, so waiting for it waits for nothing queued later); elsewhere ``z`` as it is."""
    if z.device.type != "cuda":
        return z, None
    host = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
    host.copy_(z, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _store_rows(feats: np.ndarray, pos: int, batch: tuple[torch.Tensor, Any], bar) -> int:
    """Copy a batch's features ((B, D), from :func:`_to_host`) into ``feats`` from row ``pos``;
    the next free row."""
    z, done = batch
    if done is not None:
        done.synchronize()
    feats[pos : pos + len(z)] = z.cpu().numpy()
    bar.update(len(z))
    return pos + len(z)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (identifies the exact encoder an embedding came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SimclrPathError(
            "--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto"
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SimclrPathError(f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


class FeatureExtractor(nn.Module):
    """Wrap a timm backbone so ``forward`` returns the chosen layer: (B, 3, H, W) -> (B, D).

    Args:
        backbone: timm model built with ``num_classes=0``.
        layer: ``pooled``, ``stageN`` or ``head``.
        head: projection head (needed for ``layer="head"``), mapping (B, num_features) -> (B, P).
    """

    def __init__(
        self, backbone: nn.Module, layer: str = "pooled", head: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.head = head
        self.stage: int | None = None
        m = _STAGE.fullmatch(layer)
        if m:
            info = getattr(backbone, "feature_info", None)
            if info is None or not hasattr(backbone, "forward_intermediates"):
                raise SimclrPathError(
                    f"layer {layer!r}: this timm model does not expose feature stages "
                    "(forward_intermediates); use --layer pooled"
                )
            n = len(info)
            self.stage = int(m.group(1))
            if self.stage >= n:
                raise SimclrPathError(
                    f"layer {layer!r}: the model has feature stages 0-{n - 1}; "
                    f"choose --layer stage0 ... stage{n - 1} or pooled"
                )
        elif layer == "head":
            if head is None:
                raise SimclrPathError("layer 'head': no projection head was found for this encoder")
        elif layer != "pooled":
            raise SimclrPathError(f"layer {layer!r}: expected pooled, stageN (e.g. stage3) or head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage is not None:
            (fmap,) = self.backbone.forward_intermediates(
                x, indices=[self.stage], intermediates_only=True, stop_early=True
            )
            if fmap.ndim == 4:  # (B, C, h, w) -> (B, C): global average pooling
                return fmap.mean(dim=(2, 3))
            return fmap.mean(dim=1)  # token layouts (B, T, C)
        z = self.backbone(x)
        if self.head is not None and self.layer == "head":
            z = self.head(z)
        return z


def _load_head(encoder_path: Path, device: torch.device) -> nn.Module:
    from simclr_path import model as model_mod

    loader = getattr(model_mod, "load_projection_head", None)
    if loader is None:
        raise SimclrPathError(
            "layer 'head': this version of simclr-path cannot load projection heads; "
            "use --layer pooled or stageN"
        )
    head = loader(encoder_path.parent)
    return head.eval().to(device)


class _Batches(Dataset):
    """Contiguous slices of a store: one HDF5 read per batch (much faster than patch by patch)."""

    def __init__(self, store: PatchStore, batch_size: int) -> None:
        self.store = store
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.store) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        lo = i * self.batch_size
        return torch.from_numpy(np.ascontiguousarray(self.store[lo : lo + self.batch_size]))


def _use_bf16(cfg: EmbedConfig, device: torch.device) -> bool:
    # bf16 autocast pays off on GPUs with bf16 tensor cores (not on older ones, where it is
    # emulated); on CPU it is usually slower here and changes the features, so it stays off.
    from simclr_path.train import cuda_has_native_bf16

    return bool(cfg.amp and device.type == "cuda" and cuda_has_native_bf16(device))


def embed_store(
    encoder_path: str | os.PathLike,
    store_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EmbedConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Embed every patch of ``store_path`` with the encoder and write an embedding file to ``out``.

    Output (HDF5, see :mod:`simclr_path.store`): ``/features`` float32 (N, D), ``/coords`` (N, 2),
    ``/labels`` and ``/groups`` when the store has them; attributes ``slide_id``,
    ``source_store``, ``encoder_sha256``, ``arch``, ``layer``, ``image_size``, ``label_names``.
    A store without patches gives a (0, D) file and a warning.

    Args:
        encoder_path: ``encoder.pt`` (with ``encoder.json`` beside it) or a run directory.
        store_path: patch store from ``tile`` or ``import-patches``.
        out: embedding file to write (atomically).
        cfg: batch size, layer, image size, AMP, device, workers.
        force: overwrite ``out``.
        progress: show a progress bar.
    """
    cfg = section_cfg(cfg, EmbedConfig, "embed_store")
    enc = Path(encoder_path)
    if enc.is_dir():
        enc = enc / "encoder.pt"
    # encoder.json beside the weights is read too: writing over it would orphan the encoder
    check_apart({"out": out}, {"encoder_path": encoder_path, "encoder metadata":
                               enc.with_suffix(".json"), "store_path": store_path})
    need_file(enc, "encoder file", "train one with 'simclr-path pretrain'")
    out = check_can_write(out, force)  # a folder, or a path under a file, fails before embedding
    check_hdf5_name(out, "an embedding file")
    check_replaces_kind(out, "embeddings")
    if cfg.batch_size < 1:
        raise SimclrPathError(f"embed.batch_size must be >= 1, got {cfg.batch_size}")
    info = encoder_info(enc)
    store = PatchStore(store_path)
    device = resolve_device(cfg.device)
    image_size = int(cfg.image_size) if cfg.image_size else default_image_size(info, store)
    if image_size < 8:
        raise SimclrPathError(f"embed.image_size must be >= 8, got {image_size}")
    # embed's own size matches the training scale where it can (fixres_size); a size given by
    # hand, or patches with too few pixels, may not
    mismatch = tissue_scale_mismatch(info, store, image_size)
    if mismatch:
        hint = ("; leave --image-size out to match it" if cfg.image_size
                and not tissue_scale_mismatch(info, store, default_image_size(info, store))
                else "")
        warnings.warn(f"{store.path}: {mismatch}; features may be poor{hint}", stacklevel=2)

    backbone = load_encoder(enc, arch=info.get("arch"), device=device)
    from simclr_path.model import output_stride

    stride = output_stride(backbone)
    if stride and image_size < stride and cfg.layer in ("pooled", "head"):
        # pretrain refuses such views; here the features of its last stage come from less than
        # one of its pixels per patch
        warnings.warn(f"{store.path}: embedding at {image_size} px, below {info.get('arch')}'s "
                      f"output stride ({stride} px): its last stage sees less than one pixel of "
                      "each patch; tile with a larger --patch-size (more tissue per patch; or set "
                      "--image-size)", stacklevel=2)
    head = _load_head(enc, device) if cfg.layer == "head" else None
    model = FeatureExtractor(backbone, cfg.layer, head).eval().to(device)
    channels_last = bool(cfg.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bf16 = _use_bf16(cfg, device)

    # On CPU, activations of a 256-patch batch at 224 px (~0.8 GB for the stem alone) spill out of
    # cache: ~32-patch chunks run 25% faster per patch (benchmarks/bench_embed.py).
    chunk = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, cfg.cpu_chunk)

    def forward(c: torch.Tensor) -> torch.Tensor:
        if not cfg.tta:
            return model(c).float()
        return torch.stack([model(v).float() for v in dihedral_views(c)]).mean(0)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return torch.cat([forward(c) for c in x.split(chunk)])

    n = len(store)
    with torch.inference_mode():
        try:  # one dummy patch: the feature size, and a clear error if the size does not fit
            probe = torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8)
            dim = int(run(preprocess(probe, image_size, device, channels_last)).shape[1])
        except torch.cuda.OutOfMemoryError:  # one patch: a full GPU or a huge size, not a shape
            raise SimclrPathError(
                f"{enc}: one {image_size} px patch does not fit in the GPU's free memory; free "
                "the GPU (another job on it?) or lower --image-size") from None
        except (RuntimeError, AssertionError) as exc:  # a shape (or, on CPU, memory)
            raise SimclrPathError(
                f"{enc}: the {info.get('arch')} encoder cannot run on {image_size} px inputs "
                f"({str(exc).splitlines()[0][:160]}); set --image-size to its training size"
            ) from None
        feats = np.zeros((n, dim), dtype=np.float32)
        if n == 0:
            warnings.warn(
                f"{store.path}: store has no patches (no tissue?); writing an empty embedding "
                f"file (0, {dim})",
                stacklevel=2,
            )
        else:
            batches = _Batches(store, cfg.batch_size)
            workers = min(int(cfg.workers), len(batches) - 1)  # one batch: no worker start-up cost
            if workers > 0:
                cv2_fork_safe()
            loader = DataLoader(
                batches,
                batch_size=None,
                shuffle=False,
                num_workers=max(workers, 0),
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                worker_init_fn=one_thread_worker if workers > 0 else None,
            )
            from tqdm.auto import tqdm

            pos = 0
            with tqdm(
                total=n,
                unit="patch",
                desc=f"embed {store.slide_id}",
                disable=None if progress else True,
                leave=False,
            ) as bar:
                # a batch's features are stored after the next batch is queued, and on a GPU
                # copied without blocking right after their own kernels: waiting for that copy
                # leaves the next batch running, so a GPU does not idle between batches (a
                # blocking .cpu() there waited for the next batch too)
                pending: tuple[torch.Tensor, Any] | None = None
                for raw in loader:
                    raise_pending_signal()  # one Python discarded in h5py's weakref callback
                    z = _to_host(run(preprocess(raw, image_size, device, channels_last)))
                    if pending is not None:
                        pos = _store_rows(feats, pos, pending, bar)
                    pending = z
                if pending is not None:
                    pos = _store_rows(feats, pos, pending, bar)
    # in slices: a mask of the whole table is a quarter of its size again (1e6 x 2048: 2 GB)
    if any(unusable_rows(feats[lo:lo + 65536]).any() for lo in range(0, len(feats), 65536)):
        raise SimclrPathError(
            f"{enc}: encoder produced {BAD_FEATURES} on {store.path}; the encoder is "
            "probably broken (diverged training)"
        )
    attrs: dict[str, Any] = {
        "kind": "embeddings",
        "slide_id": store.slide_id,
        "source_store": str(store.path),
        "encoder": str(enc),
        "encoder_sha256": file_sha256(enc),
        # an encoder fine-tuned with labels (simclr-path finetune): classify warns that its
        # labelled patients must not be evaluated on these embeddings
        **({"fine_tuned_from": str(info["fine_tuned_from"])} if info.get("fine_tuned_from")
           else {}),
        "arch": info.get("arch"),
        "layer": cfg.layer,
        "image_size": image_size,
        "tta": bool(cfg.tta),
        "feature_dim": dim,
        "n_patches": n,
        "mpp": store.mpp,
        "patch_size": store.patch_size,
        "store_kind": store.attrs.get("kind"),
        "source_path": store.attrs.get("source_path"),
        "level0_mpp": store.attrs.get("level0_mpp"),
    }
    labels = store.labels
    groups = store.groups
    label_names = store.label_names
    store.close()
    return write_embeddings(
        out,
        feats,
        store.coords,
        attrs,
        labels=labels,
        groups=groups,
        label_names=label_names,
        force=force,
    )
