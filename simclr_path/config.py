"""Typed parameters of every stage: the one source of truth for every default.

The CLI, the Snakemake schema (``workflow/schemas/config.schema.yaml``) and the README read these
dataclasses; they never restate a default. Each dataclass validates its values on construction so
a bad value fails early with a message naming the field.

Stage owners extend their own dataclass; keep fields JSON/YAML friendly (numbers, strings, bools,
lists, ``None``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from simclr_path.errors import SimclrPathError, need_file

# Objective powers typed where a level-0 mpp belongs: no scan is 10-100 um/px at level 0
# (a 40x scan is about 0.25 um/px, 20x about 0.5)
_MAGNIFICATIONS = (10.0, 20.0, 40.0, 60.0, 63.0, 100.0)


def magnification_hint(mpp: float) -> str | None:
    """Why a slide mpp of ``mpp`` is surely a magnification, or None."""
    if mpp not in _MAGNIFICATIONS:
        return None
    return (f"{mpp:g} looks like an objective power ({mpp:g}x), not microns per pixel: a 40x "
            "scan is about 0.25 um/px, 20x about 0.5")


def describe_overrides(run: dict[str, Any] | None) -> str:
    """A workflow run's overrides as ``preset=...; section.key=value; ...`` (the runs table's
    column), values in the config's own words: null, true, [a, b], not Python's None, True,
    ['a', 'b']; ``(defaults)`` for none."""

    def text(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
        return text.strip().removesuffix("...").strip()  # a lone scalar's document end marker

    over = dict(run or {})
    over.pop("description", None)
    parts = [f"preset={over.pop('preset')}"] if "preset" in over else []
    for section, values in over.items():
        parts += [f"{section}.{k}={text(v)}" for k, v in (values or {}).items()]
    return "; ".join(parts) or "(defaults)"


class ConfigValueError(SimclrPathError):
    """A config value out of its range or of the wrong kind; ``key`` is ``section.name``."""

    def __init__(self, key: str, msg: str, where: str = "config") -> None:
        super().__init__(f"{where}: {key} {msg}")
        self.key, self.msg, self.detail = key, msg, f"{key} {msg}"


MAX_SEED = 2**63 - 1  # torch.manual_seed takes no more
MAX_IMAGE_SIZE = 4096  # px of a network input: beyond it one patch's activations need gigabytes


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigValueError(name, msg)


def _check_types(section: Any) -> None:
    """Each field of a section dataclass holds its declared type (an int for a float is
    fine): built directly in Python, ``TileConfig(mpp="0.5")`` failed as a TypeError in a
    range check, or later, deep inside a stage. YAML and option values are converted before
    (:func:`coerce_section`). NumPy scalars become Python's (run directories save the
    config as JSON and YAML, which take no numpy types)."""
    name = next(s for s in _SECTIONS if isinstance(section, _section_cls(s)))  # subclasses too
    for key, (kind, is_list, optional) in _field_types(name).items():
        value = getattr(section, key)
        if optional and value is None:
            continue
        if is_list:
            _check(isinstance(value, (list, tuple)), f"{name}.{key}",
                   f"must be a list of {_PLURAL[kind]}, got {value!r}")
            items = list(value)
        else:
            items = [value]
        for v in items:
            _check(_is_kind(v, kind), f"{name}.{key}", f"must be {_KIND[kind]}, got {v!r}")
            # no setting means anything at NaN or infinity: they passed range checks written
            # as "> 0" and failed mid-run as a NaN loss, blaming the LR, or as a traceback
            try:
                finite = kind is not float or math.isfinite(v)
            except OverflowError:  # an integer beyond any float (10**400)
                finite = False
            _check(finite, f"{name}.{key}", f"must be a finite number, got {v!r}")
        if any(hasattr(v, "item") for v in items):
            plain = [v.item() if hasattr(v, "item") else v for v in items]
            setattr(section, key, (type(value)(plain) if is_list else plain[0]))


def _is_kind(value: Any, kind: type) -> bool:
    """``value`` is of field type ``kind`` (numpy's scalars count as numbers; no bool does)."""
    import numbers

    import numpy as np

    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is str:
        return isinstance(value, str)
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def _range(value: Any, name: str) -> tuple[float, float]:
    """``value`` as a (min, max) pair of numbers, or one clear error naming the field."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        _is_kind(v, float) for v in value)
    _check(ok, name, f"must be a [min, max] pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])


MAX_HEAD_DIM = 65536  # widest projection-head layer (model.head_hidden_dim, head_out_dim)


@dataclass
class TileConfig:
    """Tiling and tissue detection (``simclr-path tile``)."""

    mpp: float = 0.5  # target microns per pixel of the patches
    patch_size: int = 224  # patch side in pixels at ``mpp``
    stride: int | None = None  # grid step in pixels at ``mpp``; None = patch_size (no overlap)
    min_tissue: float = 0.5  # keep a patch when its tissue fraction is at least this
    tissue_mpp: float = 8.0  # resolution of the tissue mask (about 8-16 um/px)
    saturation_floor: int = 20  # Otsu threshold never goes below this (0-255), so glass stays empty
    median_blur: int = 7  # median filter size on the saturation channel (odd)
    closing_um: float = 64.0  # morphological closing radius in microns
    min_object_um2: float = 20000.0  # tissue components smaller than this are removed
    min_hole_um2: float = 20000.0  # holes smaller than this are filled
    remove_pen: bool = False  # suppress blue/green/black pen ink in the mask
    max_pen: float = 0.0  # with remove_pen: drop patches with a larger ink share (16 um margin)
    drop_white: float | None = None  # drop patches whose fraction of near-white pixels exceeds this
    drop_black: float | None = None  # drop patches whose fraction of near-black pixels exceeds this
    drop_blur: float | None = None  # drop patches whose Laplacian variance is below this
    workers: int = 2  # parallel block readers
    block_patches: int = 8  # a read block is block_patches x block_patches patches
    mpp_from_objective: bool = False  # derive mpp from objective power (10 / objective) when asked
    tiff_direct: bool = True  # decode tiled-TIFF tiles (SVS, generic TIFF) without OpenSlide

    def __post_init__(self) -> None:
        _check_types(self)
        # NaN and inf pass "> 0" tests or fail them far from here ("a 224 px patch at inf um/px")
        _check(math.isfinite(self.mpp) and self.mpp > 0, "tile.mpp",
               f"must be a finite number of microns per pixel > 0, got {self.mpp}")
        # (10 um/px is a plausible coarse target; 20x-100x as um/px are patches of millimetres)
        hint = magnification_hint(self.mpp) if self.mpp > 10 else None
        _check(hint is None, "tile.mpp", f"{hint}; give the microns per pixel to tile at (e.g. "
               "0.5)")
        _check(self.patch_size >= 8, "tile.patch_size", f"must be >= 8, got {self.patch_size}")
        _check(self.stride is None or self.stride >= 1, "tile.stride", "must be >= 1")
        _check(0.0 <= self.min_tissue <= 1.0, "tile.min_tissue", "must be in [0, 1]")
        for name in ("drop_white", "drop_black", "max_pen"):  # fractions of a patch; NaN fails too
            v = getattr(self, name)
            _check(v is None or 0.0 <= v <= 1.0, f"tile.{name}",
                   f"is a fraction of the patch's pixels and must be in [0, 1], got {v}")
        _check(self.drop_blur is None or 0.0 <= self.drop_blur < math.inf, "tile.drop_blur",
               f"is a Laplacian variance and must be >= 0, got {self.drop_blur}")
        _check(math.isfinite(self.tissue_mpp) and self.tissue_mpp > 0, "tile.tissue_mpp",
               f"must be a finite number of microns per pixel > 0, got {self.tissue_mpp}")
        _check(self.workers >= 1, "tile.workers", "must be >= 1")
        _check(self.block_patches >= 1, "tile.block_patches", "must be >= 1")
        _check(0 <= self.saturation_floor <= 255, "tile.saturation_floor",
               f"is an 8-bit saturation and must be in 0-255, got {self.saturation_floor}")
        for name in ("closing_um", "min_object_um2", "min_hole_um2"):  # 0 turns the step off
            v = getattr(self, name)
            _check(math.isfinite(v) and v >= 0, f"tile.{name}", f"must be >= 0 (0 = off), got {v}")
        _check(self.median_blur >= 1 and self.median_blur % 2 == 1, "tile.median_blur",
               f"must be an odd size >= 1 (1 = no filter), got {self.median_blur}")


# default floor of multi-crop's local view side: the output stride of ResNets and most timm CNNs
MIN_LOCAL_SIZE = 32


@dataclass
class AugmentConfig:
    """SimCLR augmentations for H&E: two views, optionally plus multi-crop's local views (Chen et al.
    2020; stain jitter after Tellez et al. 2018, 2019; multi-crop after Caron et al. 2020)."""

    image_size: int = 224  # side of each augmented view
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.5
    vflip: float = 0.5
    # albumentations' RandomRotate90 draws k in 0-3 quarter turns, k = 0 none. At 1.0, with the
    # flips, each of the 8 orientations of a patch is drawn 1/8 of the time (tissue has no
    # upright); 0.5, the default until 2026-12-07, gave the 4 transposed ones (odd k) 1/4 of the
    # views together (benchmarks/README.md, study 26)
    rot90: float = 1.0  # probability of drawing a random quarter-turn count (3/4 of it turns)
    stain_p: float = 0.8  # probability of HED stain jitter
    # natural-log optical density units (OD = -ln I): not the scale of Tellez et al.'s HED-light /
    # HED-strong settings, whose code uses another OD; by mean |dRGB| 0.05 here is 2-3x milder
    stain_scale: float = 0.05  # per-stain multiplicative jitter: alpha ~ U(1 - s, 1 + s)
    stain_shift: float = 0.05  # per-stain additive jitter: beta ~ U(-s, s), in natural-log OD units
    # brightness/contrast/saturation/hue jitter: none, half and about double these strengths all
    # scored lower on real H&E, and grayscale p 0.2 much lower (colour is a real cue; quality study 14)
    color_p: float = 0.8  # probability of brightness/contrast/saturation/hue jitter
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])
    grayscale_p: float = 0.0
    local_crops: int = 0  # extra small views per patch (multi-crop, Caron et al. 2020); 0 = two views only
    local_size: int | None = None  # side of each local view; None = half of image_size, at least 32 (or image_size if smaller)
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.2])  # area range of local crops

    def __post_init__(self) -> None:
        _check_types(self)
        _check(8 <= self.image_size <= MAX_IMAGE_SIZE, "augment.image_size",
               f"must be between 8 and {MAX_IMAGE_SIZE}")
        lo, hi = _range(self.crop_ratio, "augment.crop_ratio")
        _check(0 < lo <= hi, "augment.crop_ratio", f"must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("crop_scale", "local_crop_scale"):
            lo, hi = _range(getattr(self, name), f"augment.{name}")
            _check(0 < lo <= hi <= 1, f"augment.{name}",
                   f"must satisfy 0 < min <= max <= 1, got {getattr(self, name)}")
        _check(0 <= self.local_crops <= 64, "augment.local_crops",
               f"must be between 0 and 64, got {self.local_crops}")
        _check(self.local_size is None or 8 <= self.local_size <= self.image_size, "augment.local_size",
               f"must be between 8 and augment.image_size ({self.image_size}), got {self.local_size}")
        for name in ("hflip", "vflip", "rot90", "stain_p", "color_p", "blur_p", "grayscale_p"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"augment.{name}", f"is a probability, got {v}")
        # a stain scale of 1 or more can draw a factor <= 0, which erases or inverts a stain
        _check(0.0 <= self.stain_scale < 1.0, "augment.stain_scale",
               f"must be in [0, 1) (factors are drawn from 1 +- stain_scale), got {self.stain_scale}")
        for name in ("stain_shift", "brightness", "contrast", "saturation"):
            v = getattr(self, name)
            _check(v >= 0.0, f"augment.{name}", f"is a jitter strength and must be >= 0, got {v}")
        _check(0.0 <= self.hue <= 0.5, "augment.hue",
               f"must be in [0, 0.5] (a fraction of the hue circle), got {self.hue}")
        lo, hi = _range(self.blur_sigma, "augment.blur_sigma")
        _check(0 < lo <= hi, "augment.blur_sigma", f"must satisfy 0 < min <= max, got {self.blur_sigma}")

    @property
    def local_view_size(self) -> int:
        """Side of multi-crop's local views: ``local_size``, or half of ``image_size`` but not below
        32 px (a ResNet's output stride: smaller views reach its last stage as padding; see
        ``train.check_view_sizes``) unless ``image_size`` itself is smaller."""
        if self.local_size is not None:
            return int(self.local_size)
        return max(min(MIN_LOCAL_SIZE, self.image_size), self.image_size // 2)


@dataclass
class ModelConfig:
    """Backbone (any timm model) and SimCLR projection head."""

    arch: str = "resnet18"
    pretrained: bool = False  # hub weights; false because most sites cannot reach a hub
    weights: str | None = None  # local weights file (a timm state dict) to start from
    head_layers: int = 2  # projection head depth: 0 = none, 1 = linear, 2-3 = MLP
    head_hidden_dim: int | None = None  # None = backbone feature size
    head_out_dim: int = 128
    head_batchnorm: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.head_layers in (0, 1, 2, 3), "model.head_layers", "must be 0, 1, 2 or 3")
        # at most 65536 (SimCLR's widest head is 8192): 1e12 asked for petabytes mid-start
        _check(1 <= self.head_out_dim <= MAX_HEAD_DIM, "model.head_out_dim",
               f"must be between 1 and {MAX_HEAD_DIM}, got {self.head_out_dim}")
        _check(self.head_hidden_dim is None or 1 <= self.head_hidden_dim <= MAX_HEAD_DIM,
               "model.head_hidden_dim", f"must be between 1 and {MAX_HEAD_DIM}, or null for the "
               f"backbone's feature size, got {self.head_hidden_dim}")


@dataclass
class TrainConfig:
    """SimCLR pretraining loop."""

    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    batch_size: int = 256  # per process
    optimizer: str = "lars"  # lars | adamw | sgd
    lr: float = 0.3  # base LR at batch 256, scaled linearly with the global batch
    lr_scaling: str = "linear"  # linear | sqrt | none
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    temperature: float = 0.1
    loss: str = "ntxent"  # ntxent (SimCLR) | dcl (decoupled: the positive left out of the denominator)
    drop_nearest: int = 0  # per anchor, the k most similar other patches leave the negatives (false-negative elimination)
    hard_beta: float = 0.0  # > 0: negatives weighted by exp(beta * similarity / temperature) (Robinson et al. 2021)
    ema_decay: float | None = None  # keep a moving average of the weights (Polyak); encoder.pt is the average
    amp: bool = True  # bf16 where supported, fp16 + grad scaler otherwise, off on CPU without bf16
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 2  # DataLoader workers per process
    max_patches_per_slide: int | None = None
    seed: int = 0
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps
    sync_batchnorm: bool = True  # global-batch BN with several processes (GPU or CPU)
    time_budget_s: float | None = None  # stop after these seconds; the LR schedule is re-planned to end then
    budget_min_steps: int | None = None  # with time_budget_s: cheaper views when it buys fewer steps (simclr_path.budget)
    tensorboard: bool = True  # TensorBoard event files in RUN_DIR/tensorboard
    mlflow: bool = False  # also log to MLflow when it is installed
    mlflow_uri: str | None = None  # MLflow tracking URI; None = SQLite RUN_DIR/mlflow.db
    mlflow_experiment: str = "simclr-path"
    wandb: bool = False  # also log to Weights & Biases when it is installed (files in RUN_DIR/wandb)
    wandb_project: str = "simclr-path"
    wandb_mode: str = "offline"  # online | offline (no network; upload later: wandb sync) | disabled

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.optimizer in ("lars", "adamw", "sgd"), "train.optimizer", "must be lars, adamw or sgd")
        _check(self.lr_scaling in ("linear", "sqrt", "none"), "train.lr_scaling", "must be linear, sqrt or none")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
        _check(self.batch_size >= 2, "train.batch_size", "must be >= 2")
        _check(self.temperature > 0, "train.temperature", "must be > 0")
        # checked here: a bad value otherwise passes the DAG build and fails in the optimiser
        _check(0 < self.lr < float("inf"), "train.lr", f"must be a finite number > 0, got {self.lr}")
        _check(0 <= self.weight_decay < float("inf"), "train.weight_decay",
               f"must be a finite number >= 0, got {self.weight_decay}")
        _check(0 <= self.momentum < 1, "train.momentum",
               f"must be in [0, 1) (e.g. 0.9), got {self.momentum}")
        _check(self.loss in ("ntxent", "dcl"), "train.loss", f"must be ntxent or dcl, got {self.loss!r}")
        _check(self.drop_nearest >= 0, "train.drop_nearest", "must be >= 0")
        _check(0 <= self.seed <= MAX_SEED, "train.seed", f"must be between 0 and {MAX_SEED}")
        _check(0 <= self.hard_beta < float("inf"), "train.hard_beta", "must be a finite number >= 0")
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "train.ema_decay",
               "must be between 0 and 1 (e.g. 0.99), or null for none")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.workers >= 0, "train.workers", "must be >= 0")
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        _check(self.max_patches_per_slide is None or self.max_patches_per_slide >= 1,
               "train.max_patches_per_slide", "must be >= 1")
        _check(self.time_budget_s is None or 0 < self.time_budget_s < math.inf, "train.time_budget_s",
               "must be a finite number of seconds > 0 (null: no budget)")
        _check(self.budget_min_steps is None or self.budget_min_steps >= 1, "train.budget_min_steps",
               "must be >= 1 (or null: off)")
        _check(self.wandb_mode in ("online", "offline", "disabled"), "train.wandb_mode",
               f"must be online, offline or disabled, got {self.wandb_mode!r}")
        _check(bool(self.wandb_project.strip()), "train.wandb_project", "must not be empty")


@dataclass
class EmbedConfig:
    """Feature extraction (``simclr-path embed``)."""

    batch_size: int = 256
    layer: str = "pooled"  # pooled | stageN (pooled output of backbone stage N) | head
    image_size: int | None = None  # None = the encoder's training size scaled for its crops (embed.fixres_size)
    amp: bool = True
    channels_last: bool = True
    device: str = "auto"
    workers: int = 2
    cpu_chunk: int = 32  # on CPU the model sees batches of at most this (big ones thrash the cache)
    tta: bool = False  # average each patch's features over its 8 rotations and flips (8x the compute)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.batch_size >= 1, "embed.batch_size", "must be >= 1")
        _check(self.cpu_chunk >= 1, "embed.cpu_chunk", "must be >= 1")
        _check(self.image_size is None or 8 <= self.image_size <= MAX_IMAGE_SIZE, "embed.image_size",
               f"must be between 8 and {MAX_IMAGE_SIZE}")
        _check(self.layer in ("pooled", "head") or (self.layer.startswith("stage") and self.layer[5:].isdigit()),
               "embed.layer", f"must be pooled, head or stageN (e.g. stage3), got {self.layer!r}")
        _check(self.device in ("auto", "cpu", "cuda"), "embed.device", "must be auto, cpu or cuda")
        _check(self.workers >= 0, "embed.workers", "must be >= 0")


@dataclass
class ClassifyConfig:
    """Logistic-regression SCC classifier with patient-grouped evaluation."""

    positive_label: str | None = "SCC"  # the tumour class scored; null: macro one-vs-rest (>2 classes)
    labels: list[str] = field(default_factory=lambda: ["SCC", "normal"])
    folds: int = 5
    inner_folds: int = 3
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])
    top_k: int = 10  # slide score = mean of the top-k patch probabilities (plus the plain mean)
    bootstrap: int = 1000
    max_iter: int = 2000
    seed: int = 0  # outer folds, and which patients a label fraction keeps (probe and fine-tuning)
    label_fraction: float = 1.0  # share of each class's training patients kept per fold (min 1)
    tsne_max_points: int = 2000  # t-SNE figures: stratified sample of at most this many patches
    tsne_perplexity: float = 30.0  # capped at (points - 1) / 3 for small samples

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.folds >= 2, "classify.folds", "must be >= 2")
        _check(self.top_k >= 1, "classify.top_k", "must be >= 1")
        # the CI needs 10 resamples that hold every class (bootstrap_auroc): fewer never give one
        _check(self.bootstrap == 0 or self.bootstrap >= 10, "classify.bootstrap",
               "must be 0 (no CI) or >= 10 resamples (1000 by default)")
        _check(len(self.c_grid) >= 1 and all(c > 0 for c in self.c_grid), "classify.c_grid",
               "must list one or more positive numbers")
        _check(len(set(self.labels)) >= 2, "classify.labels", "must list at least two distinct labels")
        twice = next((c for i, c in enumerate(self.labels) if c in self.labels[:i]), None)
        _check(twice is None, "classify.labels", f"lists {twice!r} twice; list each class once")
        from simclr_path.samples import formula_problem

        bad = next(filter(None, (formula_problem(c, "label") for c in self.labels)), None)
        _check(bad is None, "classify.labels", str(bad))
        # Barnes-Hut t-SNE: 100,000 points already take the better part of an hour on a CPU
        _check(10 <= self.tsne_max_points <= 100_000, "classify.tsne_max_points",
               "must be between 10 and 100000")
        _check(self.tsne_perplexity > 0, "classify.tsne_perplexity", "must be > 0")
        _check(self.inner_folds >= 2, "classify.inner_folds", "must be >= 2")
        _check(self.max_iter >= 1, "classify.max_iter", "must be >= 1")
        _check(0 <= self.seed <= MAX_SEED, "classify.seed", f"must be between 0 and {MAX_SEED}")  # numpy's seeds are
        _check(0.0 < self.label_fraction <= 1.0, "classify.label_fraction",
               f"must be in (0, 1], got {self.label_fraction}")


# augmented view pairs (rows) of the preview figure: `simclr-path preview`, transforms.preview
# and the workflow's figures.preview_pairs
PREVIEW_PAIRS = 8
# a synthetic demo slide's level-0 side (px) and mpp: make_demo_slide and `simclr-path demo-slide`
DEMO_SLIDE_SIDE = 4096
DEMO_SLIDE_MPP = 0.5
# sample depths of cameras that write 16-bit files: import-patches scales 16-bit tiles from the
# smallest of these that holds the dataset's largest sample (unless --bit-depth states one)
BIT_DEPTHS = (8, 10, 12, 14, 16)

# The classify keys each reader uses. The workflow writes only these into a stage's config YAML
# (workflow/rules/common.smk, STAGE_KEYS), so that changing another key does not rerun that stage
# (a new t-SNE sample size must not rerun fine-tuning); keep them in step with their readers.
CLASSIFY_TSNE_KEYS = ("tsne_max_points", "tsne_perplexity", "seed")  # figures.plot_tsne
# keys that set how fast a stage runs, not what it writes: the workflow passes them on the
# command line (each stage's CLI has the option --KEY, with dashes) instead of the stage's
# config file, so changing them reruns nothing, and pretrain --resume-interrupted continues a
# run whose only change is one of them. tile.tiff_direct decodes the same pixels as OpenSlide
# (checked per slide); tile.block_patches is not one: a block is resized as a whole
SPEED_KEYS: dict[str, tuple[str, ...]] = {
    "tile": ("workers", "tiff_direct"),
    "train": ("workers", "checkpoint_every"),
    "embed": ("workers", "batch_size", "cpu_chunk"),
    "finetune": ("workers",),
}
# finetune.finetune: classify.load_table, make_folds, label_subset, evaluate_fold, pooled_results
CLASSIFY_FINETUNE_KEYS = ("labels", "positive_label", "folds", "seed", "top_k", "bootstrap")
# classify.classify: every key but the t-SNE figure's own
CLASSIFY_PROBE_KEYS = tuple(f.name for f in fields(ClassifyConfig)
                            if f.name not in ("tsne_max_points", "tsne_perplexity"))


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning of the pretrained encoder plus a linear head (``simclr-path finetune``)."""

    epochs: int = 20  # most epochs per fold; early stopping on the validation loss usually ends sooner
    patience: int = 3  # stop after this many epochs without a lower validation loss
    lr: float = 1e-4  # AdamW learning rate of the encoder (cosine decay over epochs)
    head_lr: float = 1e-3  # AdamW learning rate of the linear head
    weight_decay: float = 1e-4  # not applied to biases and normalisation weights
    batch_size: int = 64
    val_fraction: float = 0.2  # share of each class's training patients held out for early stopping
    label_fraction: float = 1.0  # keep this share of each class's training patients (at least 1)
    image_size: int | None = None  # None = the probe's: embed.image_size, else embed's default (fixres_size)
    max_patches_per_slide: int | None = None  # training patches drawn per slide and epoch; None = all
    color_jitter: float = 0.5  # probability of light stain + colour jitter per patch (flips, rot90 always)
    freeze_bn: bool = False  # keep pretrained BatchNorm statistics (for very small batches)
    final_model: bool = True  # also fine-tune on the labelled patients (less val_fraction) and save encoder.pt
    amp: bool = True  # bf16 autocast where supported (as train.amp)
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 0  # DataLoader workers reading patches
    seed: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.epochs >= 1, "finetune.epochs", "must be >= 1")
        _check(0 <= self.seed <= MAX_SEED, "finetune.seed", f"must be between 0 and {MAX_SEED}")
        _check(self.patience >= 1, "finetune.patience", "must be >= 1")
        _check(self.lr > 0, "finetune.lr", "must be > 0")
        _check(self.head_lr > 0, "finetune.head_lr", "must be > 0")
        _check(self.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
        _check(self.batch_size >= 2, "finetune.batch_size", "must be >= 2")
        _check(0.0 < self.val_fraction < 1.0, "finetune.val_fraction",
               f"must be in (0, 1), got {self.val_fraction}")
        _check(0.0 < self.label_fraction <= 1.0, "finetune.label_fraction",
               f"must be in (0, 1], got {self.label_fraction}")
        _check(self.image_size is None or 8 <= self.image_size <= MAX_IMAGE_SIZE, "finetune.image_size",
               f"must be between 8 and {MAX_IMAGE_SIZE}")
        _check(self.max_patches_per_slide is None or self.max_patches_per_slide >= 1,
               "finetune.max_patches_per_slide", "must be >= 1")
        _check(0.0 <= self.color_jitter <= 1.0, "finetune.color_jitter", "is a probability")
        _check(self.device in ("auto", "cpu", "cuda"), "finetune.device", "must be auto, cpu or cuda")
        _check(self.workers >= 0, "finetune.workers", "must be >= 0")


@dataclass
class PipelineConfig:
    """All stage parameters together: what ``--config YAML`` and the workflow's ``runs:`` override."""

    tile: TileConfig = field(default_factory=TileConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def section_cfg(cfg: Any, cls: type, caller: str) -> Any:
    """``cfg`` for an API function that reads one section (``cls``): None gives the defaults, the
    whole :class:`PipelineConfig` its section; anything else raises one clear error (it failed
    deep inside as an AttributeError)."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return check_section(cfg)
    name = next(f.name for f in fields(PipelineConfig) if f.type in (cls, cls.__name__))
    if isinstance(cfg, PipelineConfig):
        return check_section(getattr(cfg, name))
    raise SimclrPathError(f"{caller}: cfg must be a {cls.__name__} (load_config(...).{name}) or "
                          f"the whole config, got {type(cfg).__name__}")


def whole_cfg(cfg: Any, caller: str) -> PipelineConfig:
    """``cfg`` for an API function that reads several sections: the whole config (None: the
    defaults); a single section raises one clear error."""
    if cfg is None:
        return PipelineConfig()
    if not isinstance(cfg, PipelineConfig):
        raise SimclrPathError(f"{caller}: cfg must be the whole config (load_config(...)), "
                              f"got {type(cfg).__name__}")
    for f in fields(PipelineConfig):
        section = getattr(cfg, f.name)
        if not isinstance(section, _section_cls(f.name)):
            raise SimclrPathError(f"{caller}: cfg.{f.name} must be a "
                                  f"{_section_cls(f.name).__name__}, got {type(section).__name__}")
        check_section(section)
    return cfg


def check_section(section: Any) -> Any:
    """``section`` again checked as on construction (types and ranges) and returned: a field
    set after construction (``cfg.train.batch_size = 0``) is checked when a stage starts."""
    section.__post_init__()
    return section


# Named presets: overrides of the defaults above, by section. ``cpu-fast`` is tuned for a
# fixed CPU budget (benchmarks/README.md); ``gpu`` is the SimCLR-paper scale recipe.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "cpu-fast": {
        # 128 px views: at equal wall time never worse than 96 px, better once there are a few
        # hundred steps (quality study 3); 4 local crops of 64 px: 40% fewer steps in the same
        # time, higher AUROC for every seed (study 4; benchmarks/README.md, study 5 for the NaN
        # that kept it out until views below the output stride were refused)
        # no Gaussian blur, and weight decay 0.05 below: a nucleus is a few pixels across in a
        # 128 px view, so a blur of up to 1.5 px asks the encoder to ignore its detail; together
        # +0.010-0.011 AUROC (5 of 5 splits, two seeds) for two-view training (the budget
        # fallback), no change with multi-crop (quality study 12)
        # stain jitter stays light (0.05): 0.2 raised multi-crop's SCC AUROC by about 0.01 but
        # cost the two-view fallback 0.007 AUROC and 0.029 balanced accuracy (quality study 13)
        "augment": {"image_size": 128, "local_crops": 4, "blur_p": 0.0},
        # RegNetX-400MF: on a 2-core CPU 1.2-1.3x ResNet-18's steps with bf16 and 1.9x in float32
        # (CPUs without native bf16, where the budget is tightest), and level with it or better
        # in every paired comparison: two seeds of multi-crop and the two-view fallback, four
        # source images missed where ResNet-18 missed five (quality study 18)
        "model": {"arch": "regnetx_004"},
        # one loader worker: on a 2-4 core machine a second one takes a core from the model,
        # which is >95% of a CPU step (benchmarks/README.md, Pretraining)
        # AdamW at 4e-3: with RegNetX-400MF higher AUROC than 2e-3 in 14 of 15 paired splits (two
        # seeds of multi-crop, one of the two-view fallback; +0.006 to +0.011, balanced accuracy
        # +0.007 to +0.019; quality study 19); 2e-3 had beaten 1e-3 with ResNet-18 (study 5);
        # 6e-3 was better or level at 450 steps, worse at 600 (study 20), where the target is nearest
        # budget_min_steps 250: where the time budget buys fewer steps of those views (a 2-core CPU
        # without native bf16: 55-95 in 600 s; with 55, worse than random init), cheaper views
        # are trained instead: there two 96 px views got 273 steps, above both baselines (study 6)
        "train": {"batch_size": 64, "optimizer": "adamw", "lr": 4e-3, "lr_scaling": "none",
                  "weight_decay": 0.05, "warmup_epochs": 1.0, "temperature": 0.2, "workers": 1,
                  "budget_min_steps": 250},
    },
    "gpu": {
        "augment": {"image_size": 224},
        "model": {"arch": "resnet50"},
        # 256 pairs per process: about 21 GiB of activations in bf16 (benchmarks/bench_memory.py),
        # so a 40 GB card holds it; 512 needs about 42 GiB, an 80 GB card. More pairs come from
        # more processes (torchrun); the LR scales with the global batch
        "train": {"batch_size": 256, "optimizer": "lars", "lr": 0.3, "lr_scaling": "linear",
                  "weight_decay": 1e-6, "warmup_epochs": 10.0, "temperature": 0.1, "compile": True},
    },
}

_SECTIONS = {f.name: f.type for f in fields(PipelineConfig)}


def _section_cls(name: str) -> type:
    return {"tile": TileConfig, "augment": AugmentConfig, "model": ModelConfig, "train": TrainConfig,
            "embed": EmbedConfig, "classify": ClassifyConfig, "finetune": FinetuneConfig}[name]


# A number as YAML 1.2 and Python write it. PyYAML follows YAML 1.1, where a float needs a dot:
# ``lr: 1e-4`` loads as the string "1e-4" (Snakemake's loader does the same).
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@functools.cache
def _field_types(section: str) -> dict[str, tuple[type, bool, bool]]:
    """Field -> (int, float, bool or str; is a list; may be None) for a section's dataclass
    (fields of other types are not listed)."""
    out = {}
    for name, hint in typing.get_type_hints(_section_cls(section)).items():
        optional = False
        if typing.get_origin(hint) in (types.UnionType, typing.Union):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            if len(args) != 1:
                continue
            hint = args[0]
        is_list = typing.get_origin(hint) is list
        if is_list:
            hint = typing.get_args(hint)[0]
        if hint in (int, float, bool, str):
            out[name] = (hint, is_list, optional)
    return out


NULL_TEXT = ("null", "Null", "NULL", "~")  # YAML's spellings of null
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _value(value: Any, kind: type, name: str, where: str) -> Any:
    """``value`` for a field of type ``kind``: a string written as a number (``"1e-4"``) becomes
    that number and a whole float an int; a value of another type raises one clear error."""
    if isinstance(value, str) and kind in (int, float) and NUMBER.fullmatch(value.strip()):
        value = float(value.strip())
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_kind(value, kind):
        raise SimclrPathError(f"{where}: {name} must be {_KIND[kind]}, got {value!r}")
    return value


def coerce_section(section: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (one section's keys) checked against the field types, one clear error each.

    Numbers that YAML 1.1 loaders (PyYAML, Snakemake's) read as strings, such as ``lr: 1e-4``,
    are taken as the numbers they look like; a list field needs a list, a bool field true or
    false (not the string "no"), a string field a string. Ranges are the dataclasses' checks.
    """
    types_ = _field_types(section) if section in _SECTIONS else {}
    out = dict(values)
    for key, (kind, is_list, optional) in types_.items():
        if optional and kind is not str and out.get(key) in NULL_TEXT:
            # `snakemake --config train={max_steps: null}` passes null as text; no number or
            # boolean reads so, and a string field keeps it (it could be a name)
            out[key] = None
        if optional and kind is str and not is_list and out.get(key) == "":
            # an empty name or path means none: the one null `--config` can pass to a text key
            # (`model={weights: ''}`), since "null" could be a class's name
            out[key] = None
        if key not in out or (optional and out[key] is None):
            continue
        name = f"{section}.{key}"
        if is_list:
            if not isinstance(out[key], (list, tuple)):
                raise SimclrPathError(f"{where}: {name} must be a list, got {out[key]!r}")
            out[key] = [_value(v, kind, name, where) for v in out[key]]
        else:
            out[key] = _value(out[key], kind, name, where)
    return out


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Return ``base`` (a nested dict of sections) updated by ``overrides``; unknown keys raise,
    values of the wrong type raise, and numbers that YAML read as strings (``1e-4``) become numbers (:func:`coerce_section`)."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in (overrides or {}).items():
        if section not in _SECTIONS:
            from simclr_path.cli.schema import WORKFLOW_PROPERTIES  # here: it imports this module

            if section in WORKFLOW_PROPERTIES:
                raise SimclrPathError(
                    f"{where}: {section!r} belongs to the workflow's config, which the commands "
                    f"do not read; give them a YAML of stage sections only "
                    f"({', '.join(sorted(_SECTIONS))}), e.g. the workflow's "
                    "results/config/RUN/STAGE.yaml or a run's config.yaml")
            raise SimclrPathError(f"{where}: unknown section {section!r}; expected one of {sorted(_SECTIONS)}")
        if not isinstance(values, dict):
            raise SimclrPathError(f"{where}: section {section!r} must be a mapping")
        known = {f.name for f in fields(_section_cls(section))}
        for key in values:
            if key not in known:
                raise SimclrPathError(f"{where}: unknown key {section}.{key}; known keys: {sorted(known)}")
        out.setdefault(section, {}).update(coerce_section(section, values, where))
    return out


def build_config(preset: str = "default", overrides: dict[str, Any] | None = None,
                 where: str = "config") -> PipelineConfig:
    """Defaults, then a named preset, then ``overrides`` (nested dict by section)."""
    if not isinstance(preset, str) or preset not in PRESETS:
        hint = " (overrides go by keyword: overrides={...})" if isinstance(preset, dict) else ""
        raise SimclrPathError(f"{where}: unknown preset {preset!r}; choose one of "
                              f"{sorted(PRESETS)}{hint}")
    merged = merge_overrides({}, PRESETS[preset], f"preset {preset}")
    merged = merge_overrides(merged, overrides or {}, where)
    try:
        return PipelineConfig(**{s: _section_cls(s)(**merged.get(s, {})) for s in _SECTIONS})
    except TypeError as exc:  # wrong value types reach the dataclass constructors
        raise SimclrPathError(f"{where}: {exc}") from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names a key twice (see :class:`UniqueKeyLoader`)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping: YAML keeps the last in
    silence, so a second ``tile:`` section dropped the whole first one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': keys may override it
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(
                        f"line {line}: key {key!r} is given twice (first on line {seen[key]}), "
                        "and YAML would keep only the later one; merge them")
                seen[key] = line
            except TypeError:  # an unhashable key: the safe loader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; one clear error for a missing or bad file."""
    p = Path(path)
    if p.is_dir():
        raise SimclrPathError(f"{p}: is a folder; give a YAML config file")
    need_file(p, "config file")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as exc:
        raise SimclrPathError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SimclrPathError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise SimclrPathError(f"{p}: not a text file (not UTF-8); give a YAML config file") from None
    if not isinstance(data, dict):
        raise SimclrPathError(f"{p}: expected a mapping of sections (tile, augment, model, train, ...)")
    return data


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: dict[str, Any] | None = None,
                overrides_from: str = "overrides") -> PipelineConfig:
    """Build the resolved configuration from an optional YAML file, preset and overrides
    (section -> key -> value; ``overrides_from`` names them in errors: the CLI's options say
    "command line").

    A YAML file may name ``preset:`` at top level; an explicit ``preset`` argument wins.
    """
    if overrides is not None and not isinstance(overrides, dict):  # (sections: merge_overrides)
        raise SimclrPathError(f"{overrides_from}: expected a mapping of sections to mappings "
                              "of keys, e.g. {'train': {'lr': 1e-3}}")
    data: dict[str, Any] = load_yaml(path) if path else {}
    file_preset = data.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise SimclrPathError(f"{path}: preset must be a name, one of {sorted(PRESETS)}; got {file_preset!r}")
    cfg_dict = merge_overrides({}, data, str(path) if path else "config")
    cfg_dict = merge_overrides(cfg_dict, overrides or {}, overrides_from)
    try:
        return build_config(preset or file_preset or "default", cfg_dict,
                            str(path) if path else "config")
    except ConfigValueError as exc:
        # a bad value names where it was given: an option, or the YAML file, not "config"
        section, _, key = exc.key.partition(".")
        if key in (overrides or {}).get(section, {}):
            where = overrides_from
        elif isinstance(data.get(section), dict) and key in data[section]:
            where = str(path)
        else:
            raise
        raise ConfigValueError(exc.key, exc.msg, where) from None


def to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """Plain nested dict (for ``config.yaml`` in a run directory)."""
    return dataclasses.asdict(cfg)


def defaults_dict() -> dict[str, Any]:
    """The defaults of every section as a nested dict (the workflow schema test; resume fills
    keys that older checkpoints lack)."""
    return to_dict(PipelineConfig())
