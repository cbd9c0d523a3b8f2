"""End-to-end fine-tuning of the pretrained encoder plus a linear head (``simclr-path finetune``).

The fine-tuning protocol of SimCLR (Chen et al. 2020, section 4 and appendix B.5) as a patient-
level evaluation next to the linear probe of :mod:`simclr_path.classify`, on the same data and
the same splits:

* labels and patients come from :func:`simclr_path.classify.load_table` (slide labels from the
  samples sheet, or the labels and groups of imported patch stores), read from the patch stores
  themselves because fine-tuning needs the images, not embeddings;
* the outer folds are :func:`simclr_path.classify.make_folds`, so fold ``i`` tests exactly the
  slides that the linear probe's fold ``i`` tests;
* in every fold, ``label_fraction`` keeps that share of each class's training patients (at least
  one per class) -- the semi-supervised 1% / 10% setting of SimCLR, by patient here because
  patches of one patient are not independent labels; the patients are drawn by
  :func:`simclr_path.classify.label_subset` with ``classify.seed``, so the linear probe at the
  same ``classify.label_fraction`` is given exactly the same labelled patients per fold;
* ``val_fraction`` of the kept patients (by class, at least one) is held out for early stopping on
  the validation loss; with a single kept patient in some class there is nothing to hold out and
  the fold trains for ``epochs``;
* training: AdamW (encoder ``lr``, head ``head_lr``, cosine decay), class-balanced cross-entropy,
  light augmentation (flips, 90-degree rotations, and with probability ``color_jitter`` a mild
  HED stain and colour jitter of :class:`simclr_path.transforms.ColorAugment`).

Output folder (written atomically; the layout of ``classify``, so ``plot-curves``,
``plot-confusion``, ``plot-heatmap`` and the workflow's metrics table read it unchanged)::

    metrics.json              the keys of classify's, plus per-fold training details
    predictions_patches.csv   out-of-fold patch probabilities
    predictions_slides.csv    out-of-fold slide scores
    history.csv               fold, epoch, train_loss, val_loss, val_auroc, lr (the epoch's
                              first step's), seconds, best
    encoder.pt, encoder.json  the encoder fine-tuned on the labelled patients, less val_fraction
                              held out to pick the epoch (with a samples-sheet
                              split, the evaluated model of its training slides; finetune.final_model;
                              loads with model.load_encoder, embeds with 'simclr-path embed')
    classifier.pt             its linear head: a state dict of ``weight`` (K, F) and ``bias`` (K,)
    tensorboard/              per-epoch losses and validation AUROC (train.tensorboard; also to
                              mlflow.db and mlruns/ with train.mlflow, wandb/ with train.wandb,
                              when installed)
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simclr_path import __version__
from simclr_path.classify import (
    FINAL_FOLD,
    PatchTable,
    _check_disjoint,
    classification_metrics,
    evaluate_fold,
    label_info,
    label_subset,
    load_table,
    make_folds,
    metrics_document,
    pick_patients,
    pooled_results,
    task_summary,
    write_evaluation,
)
from simclr_path.config import (
    CLASSIFY_FINETUNE_KEYS,
    SPEED_KEYS,
    AugmentConfig,
    ClassifyConfig,
    FinetuneConfig,
    PipelineConfig,
    whole_cfg,
)
from simclr_path.data import cv2_fork_safe, one_thread_worker, read_patch
from simclr_path.embed import default_image_size, file_sha256
from simclr_path.errors import SimclrPathError, need_file
from simclr_path.model import encoder_info, feature_dim, load_encoder, output_stride, save_encoder
from simclr_path.outputs import (
    FINETUNE_MARKER,
    as_paths,
    atomic_dir,
    atomic_output,
    check_apart,
    check_can_write,
    raise_pending_signal,
)
from simclr_path.store import PatchStore
from simclr_path.transforms import ColorAugment, eval_transform, normalize, to_float

# what this command writes into its results folder: --force replaces only a folder holding one
RESULT_FILES = ("metrics.json", "predictions_patches.csv", "predictions_slides.csv", "history.csv",
                FINETUNE_MARKER)
# what else it writes there: the final model (names any model folder holds, so never what
# marks a folder as this command's: --force replaced a folder of a copied encoder) and the
# experiment trackers' files (train.tensorboard, mlflow, wandb)
OWNED_FILES = ("encoder.pt", "encoder.json", "classifier.pt", "tensorboard", "mlruns",
                  "mlflow.db", "wandb")

HISTORY_COLUMNS = ["fold", "epoch", "train_loss", "val_loss", "val_auroc", "lr", "seconds", "best"]
# Light colour augmentation for fine-tuning: a fraction of the pretraining strengths, no blur or
# grayscale (the labels depend on morphology and staining that strong jitter would blur away).
_LIGHT = {"stain_scale": 0.03, "stain_shift": 0.03, "brightness": 0.1, "contrast": 0.1,
          "saturation": 0.05, "hue": 0.01, "blur_p": 0.0, "grayscale_p": 0.0}


# ----------------------------------------------------------------------------------------------
# Data: patch stores read through classify.load_table
# ----------------------------------------------------------------------------------------------
class _StoreLabels:
    """A patch store as :func:`~simclr_path.classify.load_table` reads embedding files: its
    coords, labels, groups and slide id, with zero-width features (N, 0)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.store = PatchStore(path)
        self.path = self.store.path
        self.attrs = {**self.store.attrs, "store_kind": self.store.attrs.get("kind")}
        self.features = np.zeros((len(self.store), 0), dtype=np.float32)
        self.coords = self.store.coords
        self.labels = self.store.labels
        self.groups = self.store.groups

    @property
    def slide_id(self) -> str:
        return self.store.slide_id

    @property
    def label_names(self) -> list[str] | None:
        return self.store.label_names

    def __len__(self) -> int:
        return len(self.store)


def load_patch_table(
    store_paths: Sequence[str | os.PathLike],
    samples: str | os.PathLike | pd.DataFrame | None,
    cfg: PipelineConfig,
) -> tuple[PatchTable, list[PatchStore]]:
    """Labels, patients and patch addresses of every patch (``source`` = index into the returned
    stores, ``patch_index`` = index in its store), exactly as ``classify`` labels embeddings."""
    opened: list[_StoreLabels] = []

    def opener(p: str | os.PathLike) -> _StoreLabels:
        opened.append(_StoreLabels(p))
        return opened[-1]

    t = load_table(store_paths, samples, cfg.classify, opener=opener, what="patch store")
    stores = [o.store for o in opened]
    first = _first_used(stores)
    odd = next((s for s in stores if len(s) and s.patch_size != first.patch_size), None)
    if odd is not None:
        raise SimclrPathError(
            f"{odd.path}: patches are {odd.patch_size} px but {first.path} has "
            f"{first.patch_size} px; tile or import every store with the same patch size"
        )
    # one input size for all (unlike embed's per-store sizes): another mpp would show the model
    # those slides' tissue at another scale than the rest, and than the probe sees it
    scaled = [s for s in stores if len(s) and s.mpp is not None]
    odd = next((s for s in scaled if abs(float(s.mpp) / float(scaled[0].mpp) - 1) > 1e-3), None)
    if odd is not None:
        raise SimclrPathError(
            f"{odd.path}: patches at {float(odd.mpp):g} um/px but {scaled[0].path} at "
            f"{float(scaled[0].mpp):g} um/px; fine-tuning shows every store at one input size, so "
            "the tissue would reach the model at two scales: tile every slide at the same --mpp"
        )
    unknown = next((s for s in stores if len(s) and s.mpp is None), None)
    if unknown is not None and scaled:
        # (imported tiles carry no mpp): their scale cannot be checked against the others'
        warnings.warn(f"{unknown.path}: no mpp recorded (imported tiles?) while {scaled[0].path} "
                      f"is at {float(scaled[0].mpp):g} um/px; fine-tuning shows both at one input "
                      "size, so make sure the tiles are at that scale", stacklevel=2)
    return t, stores


def _warn_fixed_epochs(folds: list[dict[str, Any]], epochs: int,
                       final: dict[str, Any] | None = None) -> None:
    """Warn about the folds, and the final model (refitted on every slide), that trained without
    early stopping (no validation patients): a model under another protocol than the rest must
    not pass in silence. ``final`` is the final model's fit, None when there is none or it is
    the split's evaluated fold."""
    fixed = [f["fold"] for f in folds if not f["early_stopping"]]
    final_fixed = final is not None and not final["early_stopping"]
    if not fixed and not final_fixed:
        return
    parts = [] if not fixed else ["every fold"] if len(fixed) == len(folds) else [
        f"fold(s) {', '.join(map(str, fixed))} of {len(folds)}"]
    if final_fixed:
        parts.append("the final model")
    which = " and ".join(parts)
    warnings.warn(f"fine-tuning without early stopping in {which}: some class has a single "
                  "labelled training patient there, so no validation patients were held out; "
                  f"{'it' if which == 'the final model' else 'they'} trained {epochs} epochs on "
                  "every labelled patient", stacklevel=3)


def _first_used(stores: Sequence[PatchStore]) -> PatchStore:
    """The first store that holds patches: empty ones add none, whatever their patch size or mpp
    (``load_table`` has refused a set of stores without patches)."""
    return next((s for s in stores if len(s)), stores[0])


def validation_split(
    slides: pd.DataFrame, classes: Sequence[str], fraction: float, seed: int
) -> set[str]:
    """Patients held out for early stopping: ``fraction`` of each class's patients (at least one),
    or none when some class could not keep a training and a validation patient."""
    counts = slides.groupby("label")["patient_id"].nunique()
    if any(counts.get(c, 0) < 2 for c in classes):
        return set()
    val = pick_patients(slides, classes, fraction, np.random.default_rng([seed, 2]), leave=1)
    for c in classes:
        pats = set(slides.loc[slides["label"] == c, "patient_id"])
        if not pats & val or not pats - val:  # a patient with slides of both classes
            return set()
    return val


# ----------------------------------------------------------------------------------------------
# Batches, augmentation and the model
# ----------------------------------------------------------------------------------------------
class _PatchBatches(Dataset):
    """Batch ``b`` = uint8 patches (B, S, S, 3) of table rows ``batches[b]`` and those rows (B,).

    Rows are random across the stores, so each patch is one direct chunk read
    (:func:`simclr_path.data.read_patch`), not h5py fancy indexing (~50x slower per patch)."""

    def __init__(self, stores: Sequence[PatchStore], source: np.ndarray, index: np.ndarray,
                 batches: Sequence[np.ndarray]) -> None:
        self.stores, self.source, self.index, self.batches = list(stores), source, index, batches
        self.size = _first_used(stores).patch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batches[b]
        out = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        for j, r in enumerate(rows):
            out[j] = read_patch(self.stores[self.source[r]], int(self.index[r]))
        return torch.from_numpy(out), torch.from_numpy(np.asarray(rows, dtype=np.int64))


def _iter_batches(data: _PatchBatches, workers: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if workers == 0 or len(data) < 2:
        for b in range(len(data)):
            yield data[b]
        return
    cv2_fork_safe()  # the workers augment with OpenCV
    yield from DataLoader(data, batch_size=None, shuffle=False, num_workers=min(workers, len(data)),
                          pin_memory=pin, worker_init_fn=one_thread_worker)


def _batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


class Augment:
    """Fine-tuning augmentation of a uint8 batch (B, S, S, 3) -> normalised float (B, 3, s, s):
    resize to ``image_size``, random flip and 90-degree rotation per patch, and with probability
    ``color_jitter`` a light stain and colour jitter; all randomness from one torch Generator."""

    def __init__(self, image_size: int, color_jitter: float) -> None:
        self.image_size = int(image_size)
        self.color = None
        if color_jitter > 0:
            light = AugmentConfig(image_size=max(8, self.image_size), stain_p=color_jitter,
                                  color_p=color_jitter, **_LIGHT)
            self.color = ColorAugment(light)

    def __call__(self, raw: torch.Tensor, g: torch.Generator, device: torch.device) -> torch.Tensor:
        x = to_float(raw.to(device, non_blocking=True))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = x.contiguous()
        n = len(x)
        k = torch.randint(0, 4, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        for r in (1, 2, 3):
            idx = (k == r).nonzero().squeeze(1).to(device)
            if len(idx):
                x[idx] = torch.rot90(x[idx], r, dims=(2, 3))
        idx = flip.nonzero().squeeze(1).to(device)
        if len(idx):
            x[idx] = x[idx].flip(3)
        if self.color is not None:
            return self.color(x, g)
        return normalize(x)


def _balanced_weights(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """Class weights (K,) n / (K' * n_c) over the K' classes present (sklearn's "balanced"); 0
    for an absent class, which no target then selects."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32, device=device)


class FinetuneModel(nn.Module):
    """Encoder plus linear head: (B, 3, H, W) -> logits (B, K)."""

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _train_mode(model: FinetuneModel, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # keep the pretrained running statistics: tiny batches make them noisy
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ----------------------------------------------------------------------------------------------
# One training (an outer fold or the final model)
# ----------------------------------------------------------------------------------------------
class _Run:
    """Everything a training needs that is the same for every fold."""

    def __init__(self, t: PatchTable, stores: list[PatchStore], encoder: Path, ft: FinetuneConfig,
                 image_size: int, device: torch.device, progress: bool, tracker: Any) -> None:
        self.t, self.stores, self.encoder, self.ft = t, stores, encoder, ft
        self.image_size, self.device, self.progress, self.tracker = image_size, device, progress, tracker
        self.k = len(t.classes)
        self.augment = Augment(image_size, ft.color_jitter)
        from simclr_path.train import amp_mode

        self.amp = amp_mode(ft, device)  # reads ft.amp: bf16 where it pays off, fp16 on old GPUs

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def _cap(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """At most ``max_patches_per_slide`` random rows of each slide (all when unset)."""
        cap = self.ft.max_patches_per_slide
        if cap is None:
            return rows
        keep = []
        for s in pd.unique(self.t.slide[rows]):
            r = rows[self.t.slide[rows] == s]
            keep.append(r if len(r) <= cap else rng.choice(r, cap, replace=False))
        return np.sort(np.concatenate(keep)) if keep else rows

    def predict(self, model: FinetuneModel, rows: np.ndarray, name: str | None = "fine-tuning"
                ) -> np.ndarray:
        """Class probabilities (len(rows), K) of the table rows, eval transform, no augmentation.
        Non-finite outputs (weights that diverged in the last steps) stop with one line naming
        ``name``, before they reach the metrics; ``name=None`` returns them unchecked."""
        model.eval()
        out = np.zeros((len(rows), self.k), dtype=np.float64)
        data = _PatchBatches(self.stores, self.t.source, self.t.patch_index,
                             _batches(np.asarray(rows), self.ft.batch_size))
        pos = 0
        with torch.inference_mode(), self.autocast():
            for raw, _ in _iter_batches(data, self.ft.workers, self.device.type == "cuda"):
                x = eval_transform(raw, self.image_size, self.device)
                p = torch.softmax(model(x).float(), dim=1).cpu().numpy()
                out[pos:pos + len(p)] = p
                pos += len(p)
        if name is not None and not np.isfinite(out).all():
            raise SimclrPathError(_diverged(name))
        return out

    def fit(self, name: str, train_rows: np.ndarray, val_rows: np.ndarray, seed: int
            ) -> tuple[FinetuneModel, list[dict[str, Any]], dict[str, Any]]:
        """Fine-tune a fresh copy of the encoder on ``train_rows``; early stopping on the
        validation loss of ``val_rows`` (none: train ``epochs``). Returns the best model, the
        per-epoch history and a summary (epochs run, best epoch, stop reason)."""
        ft, t, dev = self.ft, self.t, self.device
        torch.manual_seed(seed)
        rng = np.random.default_rng([seed, 3])
        g = torch.Generator().manual_seed(seed)
        model = FinetuneModel(load_encoder(self.encoder, device=dev), self.k).to(dev)
        from simclr_path.train import param_groups

        groups = []
        for part, lr in ((model.backbone, ft.lr), (model.head, ft.head_lr)):
            for grp in param_groups(part, ft.weight_decay):
                grp.pop("adapt")
                groups.append({**grp, "lr": lr})
        opt = torch.optim.AdamW(groups)
        # the rows one epoch trains on: max_patches_per_slide caps each slide, so the class mix
        # (and the balancing weights) is that of the capped rows, the same count every epoch
        epoch_rows = self._cap(train_rows, np.random.default_rng(0))
        counts = np.bincount(t.y[epoch_rows], minlength=self.k).astype(np.float64)
        if (counts == 0).any():
            missing = [t.classes[i] for i in np.flatnonzero(counts == 0)]
            raise SimclrPathError(f"{name}: no training patches of class {missing[0]!r}; add "
                                  "patients of that class or raise finetune.label_fraction")
        # class-balanced cross-entropy, as classify's class_weight="balanced"
        weight = _balanced_weights(counts, dev)
        # the validation loss balances the validation patients' own mix (a few whole patients:
        # unrelated to training's), so no class decides the stopping epoch alone
        val_weight = _balanced_weights(np.bincount(t.y[val_rows], minlength=self.k), dev)
        steps_per_epoch = math.ceil(len(epoch_rows) / ft.batch_size)
        total = max(1, ft.epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
        scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)
        yv = torch.as_tensor(t.y[val_rows], device=dev)
        history: list[dict[str, Any]] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        bad, stopped = 0, "epochs"
        from tqdm.auto import tqdm

        bar = tqdm(range(1, ft.epochs + 1), desc=f"finetune {name}", unit="epoch", leave=False,
                   disable=None if self.progress else True)
        for epoch in bar:
            t0 = time.perf_counter()
            lr_start = opt.param_groups[0]["lr"]  # the epoch's first step's (the schedule then decays it)
            rows = self._cap(train_rows, rng)
            rows = rows[rng.permutation(len(rows))]
            data = _PatchBatches(self.stores, t.source, t.patch_index, _batches(rows, ft.batch_size))
            _train_mode(model, ft.freeze_bn)
            # the loss sum stays on the device: a float() or isfinite test per step would make
            # the CPU wait for the GPU at every step; it is read (and checked) once per epoch
            tot, n = torch.zeros((), dtype=torch.float64, device=dev), 0
            for raw, r in _iter_batches(data, ft.workers, dev.type == "cuda"):
                raise_pending_signal()  # one Python discarded in h5py's weakref callback
                if len(r) < 2 and n > 0:  # a single-patch last batch breaks BatchNorm; skip it
                    continue
                x = self.augment(raw, g, dev)
                y = torch.as_tensor(t.y[r.numpy()]).to(dev, non_blocking=True)
                with self.autocast():
                    loss = F.cross_entropy(model(x).float(), y, weight=weight)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                tot += loss.detach() * len(r)
                n += len(r)
            train_loss = float(tot) / max(n, 1)
            if not math.isfinite(train_loss):
                raise SimclrPathError(f"{name}: the fine-tuning loss became {train_loss} in "
                                      f"epoch {epoch}; lower finetune.lr / finetune.head_lr")
            row: dict[str, Any] = {"fold": name, "epoch": epoch, "train_loss": train_loss,
                                   "val_loss": float("nan"), "val_auroc": float("nan"),
                                   "lr": lr_start, "best": False}
            if len(val_rows):
                pv = self.predict(model, val_rows, name=None)
                if np.isfinite(pv).all():
                    row["val_loss"] = float(F.nll_loss(torch.log(torch.as_tensor(pv, device=dev)
                                                                 .clamp_min(1e-12)).float(), yv,
                                                       weight=val_weight))
                    row["val_auroc"] = classification_metrics(t.y[val_rows], pv, t.classes,
                                                              t.positive).get("auroc", float("nan"))
                # diverged weights (non-finite outputs) never improve: an earlier epoch is kept
                improved = math.isfinite(row["val_loss"]) and (
                    best is None or row["val_loss"] < best[0] - 1e-6)
            else:
                improved = True  # no validation patients: the last epoch is kept
            if improved:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (row["val_loss"] if len(val_rows) else 0.0, epoch, state)
                row["best"], bad = True, 0
            else:
                bad += 1
            row["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(row)
            self._log(name, row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
            if bad >= ft.patience:
                stopped = "early_stopping"
                break
        bar.close()
        if best is None:  # every epoch's validation predictions were non-finite
            raise SimclrPathError(_diverged(name))
        model.load_state_dict(best[2])
        for h in history:  # mark only the epoch finally kept
            h["best"] = h["epoch"] == best[1]
        info = {"epochs_run": len(history), "best_epoch": best[1], "stopped": stopped,
                "early_stopping": bool(len(val_rows)),
                "n_train_patches": len(train_rows), "n_val_patches": len(val_rows),
                # finetune.max_patches_per_slide draws this many of them afresh every epoch
                "n_train_patches_per_epoch": len(epoch_rows),
                "train_loss_first": history[0]["train_loss"],
                "train_loss_last": history[-1]["train_loss"],
                "best_val_loss": best[0] if len(val_rows) else None}
        return model, history, info

    def _log(self, name: str, row: dict[str, Any]) -> None:
        # epochs restart in every fold: W&B gets them as the metric "{name}/epoch"
        keys = ("train_loss", "val_loss", "val_auroc", "lr")
        self.tracker.scalars({f"{name}/{k}": row[k] for k in keys}, row["epoch"],
                             step_key=f"{name}/epoch")


def _diverged(name: str) -> str:
    return (f"{name}: the fine-tuned model predicts non-finite probabilities; lower "
            "finetune.lr / finetune.head_lr")


def _rows_of(t: PatchTable, patients: set[str], mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask & np.isin(t.patient, np.array(sorted(patients), dtype=object)))


def _split_rows(t: PatchTable, train_slides: pd.DataFrame, train_mask: np.ndarray,
                ft: FinetuneConfig, ccfg: ClassifyConfig, fold: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Label fraction (classify's draw for this ``fold``: the probe's patients at that fraction),
    then the inner validation split (``seed``) of the training patients."""
    kept = label_subset(train_slides, t.classes, ft.label_fraction, ccfg.seed, fold)
    kept_slides = train_slides[train_slides["patient_id"].isin(kept)]
    val = validation_split(kept_slides, t.classes, ft.val_fraction, seed)
    _check_disjoint(np.array(sorted(kept - val), dtype=object), np.array(sorted(val), dtype=object))
    info = {**label_info(train_slides, t.classes, kept, ft.label_fraction),
            "n_val_patients": len(val)}
    return _rows_of(t, kept - val, train_mask), _rows_of(t, val, train_mask), info


class _FoldCache:
    """The folds a fine-tuning has finished, kept in ``.NAME.folds/`` beside its results folder
    ``NAME`` until the run succeeds, so that ``resume`` continues a killed run (a GPU job's time
    limit, Ctrl-C) at its first unfinished fold instead of the first fold. Each fold's files are
    named by ``key``, a fingerprint of everything that decides its result, so folds of other
    inputs or settings (or of a run writing the same output at the same time) are never used:
    ``fold{f}-{key}.npz`` (the fold's test rows and their (n, K) probabilities), then
    ``fold{f}-{key}.json`` (its metrics and epoch history; written last, so it marks the fold
    done). Keeping folds is a convenience: a fold that cannot be saved or read trains again."""

    # its files, and outputs.atomic_output's temporary names for them
    _NAME = re.compile(r"\.?fold\d+-[0-9a-f]{16}\.(npz|json)(\.[^.]+\.tmp)?")

    def __init__(self, out_dir: Path, key: dict[str, Any]) -> None:
        import hashlib

        self.dir = out_dir.parent / f".{out_dir.name}.folds"
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.started = time.time()
        self.warned = False

    def _file(self, f: int, ext: str) -> Path:
        return self.dir / f"fold{f}-{self.key}.{ext}"

    def start(self, resume: bool) -> dict[int, tuple[np.ndarray, np.ndarray, dict[str, Any],
                                                 list[dict[str, Any]]]]:
        """The finished folds of this key (with ``resume``: kept; without: named, and trained
        again, their files replaced as the new ones finish)."""
        if self.dir.is_symlink() or (self.dir.exists() and (
                not self.dir.is_dir()
                or any(not self._NAME.fullmatch(e.name) for e in self.dir.iterdir()))):
            # never emptied or written through: it is not one this command made
            raise SimclrPathError(f"{self.dir}: is in the way of the folder where fine-tuning "
                                  "keeps its finished folds, and holds what it did not write; "
                                  "move it")
        done = sorted(int(m.group(1)) for e in (self.dir.glob(f"fold*-{self.key}.json")
                                                 if self.dir.is_dir() else [])
                      if (m := re.fullmatch(rf"fold(\d+)-{self.key}\.json", e.name)))
        if not resume:
            if done:
                print(f"{self.dir}: an interrupted fine-tuning of these inputs finished fold(s) "
                      f"{', '.join(map(str, done))}; training them again (--resume keeps them)",
                      file=sys.stderr, flush=True)
            return {}
        kept: dict[int, Any] = {}
        for f in done:
            try:
                with np.load(self._file(f, "npz")) as z:
                    rows, proba = np.asarray(z["rows"]), np.asarray(z["proba"])
                rec = json.loads(self._file(f, "json").read_text())
                kept[f] = (rows, proba, dict(rec["fold"]), list(rec["history"]))
            except Exception as exc:  # noqa: BLE001 - zip, JSON and shape errors alike
                print(f"{self.dir}: fold {f} cannot be read ({type(exc).__name__}); it trains "
                      "again", file=sys.stderr, flush=True)
        if kept:
            print(f"{self.dir}: resuming the interrupted fine-tuning; fold(s) "
                  f"{', '.join(map(str, sorted(kept)))} kept", file=sys.stderr, flush=True)
        elif self.dir.is_dir():
            print(f"{self.dir}: no finished folds of these inputs (encoder, stores, labels, "
                  "config); starting over", file=sys.stderr, flush=True)
        return kept

    def save(self, f: int, rows: np.ndarray, proba: np.ndarray, fold: dict[str, Any],
             history: list[dict[str, Any]]) -> None:
        try:
            with atomic_output(self._file(f, "npz"), force=True) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, rows=rows, proba=proba)
            # NaN stays NaN (history.csv writes it); numpy scalars and arrays as Python's
            text = json.dumps({"fold": fold, "history": history},
                              default=lambda o: o.item() if isinstance(o, np.generic) else o.tolist())
            with atomic_output(self._file(f, "json"), force=True) as tmp:
                tmp.write_text(text)
        except (OSError, SimclrPathError) as exc:
            if not self.warned:
                self.warned = True
                warnings.warn(f"{self.dir}: cannot keep fold {f} for --resume ({exc}); the run "
                              "goes on", stacklevel=3)

    def remove(self) -> None:
        """After a successful run: this key's folds, and any other key's from before this run
        began (a run at the same time keeps its own); the folder once empty."""
        if not self.dir.is_dir() or self.dir.is_symlink():
            return
        for e in self.dir.iterdir():
            try:
                if self._NAME.fullmatch(e.name) and (
                        f"-{self.key}." in e.name or e.stat().st_mtime < self.started):
                    e.unlink()
            except OSError:
                pass
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _fold_key(t: PatchTable, store_paths: Sequence[Path], enc_sha256: str, image_size: int,
              fold_of_slide: np.ndarray, cfg: PipelineConfig) -> dict[str, Any]:
    """What decides a fold's result: the encoder's content, the stores (path, size and
    modification time: a store tiled again is another), the patches' labels and patients, the
    folds, the input size and the config (less what sets only the speed, and the device)."""
    import hashlib

    h = hashlib.sha256()
    for a in (t.y, t.patch_index, t.source, np.asarray(fold_of_slide)):
        if a is not None:
            h.update(np.ascontiguousarray(a).astype(np.int64).tobytes())
    for a in (t.slide, t.patient, t.slides["slide_id"].to_numpy()):
        h.update("\0".join(map(str, a)).encode())
    h.update("\0".join(t.classes).encode())
    stores = []
    for p in store_paths:
        st = Path(p).stat()
        stores.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    skip = (*SPEED_KEYS["finetune"], "device")
    return {"simclr_path": __version__, "encoder_sha256": enc_sha256, "stores": stores,
            "table_sha256": h.hexdigest(), "image_size": image_size,
            "finetune": {k: v for k, v in asdict(cfg.finetune).items() if k not in skip},
            "classify": {k: getattr(cfg.classify, k) for k in CLASSIFY_FINETUNE_KEYS}}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def finetune(
    store_paths: Sequence[str | os.PathLike],
    encoder: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples: str | os.PathLike | pd.DataFrame | None = None,
    cfg: PipelineConfig | None = None,
    force: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune the encoder with a linear head under ``classify``'s patient-grouped folds.

    Args:
        store_paths: patch stores (one per slide with a samples sheet, or imported patch stores
            carrying labels and groups).
        encoder: ``encoder.pt`` of a pretraining run (``encoder.json`` beside it) or the run dir.
        out_dir: results folder (see the module docstring), written atomically.
        samples: samples sheet (path or DataFrame); None when the stores carry labels.
        cfg: its ``finetune`` (training), ``classify`` (labels, folds, top-k, bootstrap, seed) and
            ``train`` (tensorboard / mlflow / wandb tracking) sections are used.
        force: replace an existing ``out_dir``.
        progress: show progress bars.
        resume: keep the outer folds that an interrupted run of the same inputs finished
            (``.NAME.folds/`` beside ``out_dir``, removed when a run ends); without it they train
            again. A samples-sheet split (one fold, whose model is the one saved) trains again.

    Returns:
        The metrics written to ``metrics.json``.
    """
    from simclr_path.train import caller_state, restore_caller_state

    caller = caller_state()
    try:
        cfg = whole_cfg(cfg, "finetune")
        ft, ccfg = cfg.finetune, cfg.classify
        store_paths = as_paths(store_paths, "store_paths")
        if not store_paths:
            raise SimclrPathError("no patch stores given; pass one or more STORE.h5")
        check_apart({"out_dir": out_dir}, {"store_paths": store_paths, "encoder": encoder,
                                         "samples": samples}, replaces_dir=force)
        check_can_write(out_dir, force, kind="dir", markers=RESULT_FILES,
                        owned=OWNED_FILES)
        enc = Path(encoder)
        if enc.is_dir():
            enc = enc / "encoder.pt"
        need_file(enc, "encoder file", "train one with 'simclr-path pretrain'")
        info = encoder_info(enc)
        t, stores = load_patch_table(store_paths, samples, cfg)
        # the probe's input size (embed.image_size, else embed's default: whole patches at the scale
        # the encoder's crops showed the tissue; the training size would shrink it, 1.32x for crops
        # of 0.2-1), so that fine-tuning and the probe see the same tissue scale
        image_size = int(ft.image_size or cfg.embed.image_size
                         or default_image_size(info, _first_used(stores)))
        from simclr_path.train import check_view_sizes, resolve_device

        device = resolve_device(ft.device)
        # a broken or mismatched encoder fails before any training
        backbone = load_encoder(enc, device="cpu")
        # ties the result to the encoder's content, not only its path (as classify's results are)
        enc_sha256 = file_sha256(enc)
        key = ("finetune.image_size" if ft.image_size else
               "finetune.image_size (embed.image_size)" if cfg.embed.image_size else
               "finetune.image_size (embed's default size)")
        check_view_sizes([(key, image_size, "set finetune.image_size")],
                         str(info.get("arch", "the encoder")), output_stride(backbone))
        del backbone
        fold_of_slide, scheme = make_folds(t.slides, t.classes, ccfg)
        slide_fold = dict(zip(t.slides["slide_id"], fold_of_slide))
        patch_fold = np.array([slide_fold[s] for s in t.slide])
        fold_ids = sorted(f for f in set(fold_of_slide.tolist()) if f >= 0)
        proba = np.full((len(t.y), len(t.classes)), np.nan)
        folds_out: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        # a samples-sheet split's one fold also gives the saved model: nothing to keep
        cache = (None if scheme == "split" else
                 _FoldCache(Path(out_dir), _fold_key(t, store_paths, enc_sha256, image_size,
                                                     fold_of_slide, cfg)))
        done = {} if cache is None else cache.start(resume)
        t_start = time.perf_counter()

        with atomic_dir(out_dir, force=force, markers=RESULT_FILES,
                        owned=OWNED_FILES) as tmp:
            from simclr_path.train import _Tracker

            (tmp / FINETUNE_MARKER).write_text("simclr-path finetune results\n")
            tracker = _Tracker(tmp, cfg, enabled=True, name=Path(out_dir).name,
                               moves_to=Path(out_dir))
            summary: dict[str, Any] | None = None
            try:
                run = _Run(t, stores, enc, ft, image_size, device, progress, tracker)
                kept = None
                for f in fold_ids:
                    te = patch_fold == f
                    rows, p_f, fold_rec, hist = done.get(f, (None, None, None, None))
                    if rows is not None and np.array_equal(rows, np.flatnonzero(te)) \
                            and p_f.shape == (int(te.sum()), len(t.classes)):
                        proba[te] = p_f
                        folds_out.append(fold_rec)
                        history += hist
                        for h in hist:  # its epochs in the trackers too, as if it had run now
                            run._log(h["fold"], h)
                        continue
                    tr = ~te
                    _check_disjoint(t.patient[tr], t.patient[te])
                    train_slides = t.slides[np.asarray(fold_of_slide) != f]
                    tr_rows, va_rows, split = _split_rows(t, train_slides, tr, ft, ccfg, f,
                                                          ft.seed + 1000 * f)
                    _check_disjoint(t.patient[tr_rows], t.patient[va_rows])
                    model, hist, fit = run.fit(f"fold{f}", tr_rows, va_rows, ft.seed + f)
                    history += hist
                    proba[te] = run.predict(model, np.flatnonzero(te), f"fold{f}")
                    folds_out.append({
                        "fold": int(f),
                        "n_test_patches": int(te.sum()),
                        "n_train_patients": len(set(t.patient[tr_rows])),
                        "n_test_patients": len(set(t.patient[te])),
                        **split,
                        **fit,
                        **evaluate_fold(t, te, proba[te], ccfg),
                    })
                    if cache is not None:
                        cache.save(f, np.flatnonzero(te), proba[te], folds_out[-1], hist)
                    # a split's one fold trains the final model (see below); else it is done
                    kept = (model, {**split, **fit}) if scheme == "split" else None
                    del model
                patch_metrics, slide_metrics, slides_pred, patches = pooled_results(
                    t, proba, patch_fold, slide_fold, ccfg)
                final: dict[str, Any] | None = None
                if ft.final_model and kept is not None:
                    # with a samples-sheet split the evaluated model is the one saved: training
                    # again would draw other validation (and, at a label fraction, training)
                    # patients and give another model than metrics.json describes
                    model, final = kept
                elif ft.final_model:
                    tr_rows, va_rows, split = _split_rows(t, t.slides, np.ones(len(t.y), bool),
                                                          ft, ccfg, FINAL_FOLD, ft.seed + 999_999)
                    model, hist, fit = run.fit("final", tr_rows, va_rows, ft.seed + 999_999)
                    history += hist
                    final = {**split, **fit}
                _warn_fixed_epochs(folds_out, ft.epochs,
                                   final if kept is None and ft.final_model else None)
                if ft.final_model:
                    first = _first_used(stores)
                    # the patches it was fine-tuned on, whole, at image_size (embed sizes from these)
                    save_encoder(model.backbone, tmp / "encoder.pt", info["arch"],
                                 image_size=image_size, mpp=first.mpp, patch_size=first.patch_size,
                                 fine_tuned_from=str(enc), classes=t.classes,
                                 positive=None if t.positive is None else t.classes[t.positive],
                                 label_fraction=ft.label_fraction, simclr_path_version=__version__)
                    torch.save({k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                               tmp / "classifier.pt")
                task = task_summary(t, "samples sheet" if samples is not None else "patch stores",
                                    scheme, len(fold_ids), slides_pred, ccfg)
                task.update({"model": "fine-tuned encoder + linear head", "encoder": str(enc),
                             "encoder_sha256": enc_sha256,
                             "arch": info.get("arch"), "layer": "pooled", "image_size": image_size,
                             "label_fraction": ft.label_fraction})
                metrics = metrics_document(
                    task, patch_metrics, slide_metrics, folds_out, final,
                    # the classify keys it read (the workflow's finetune YAML holds only those)
                    {"finetune": asdict(ft),
                     "classify": {k: getattr(ccfg, k) for k in CLASSIFY_FINETUNE_KEYS}},
                    wall_time_s=round(time.perf_counter() - t_start, 3))
                write_evaluation(tmp, metrics, patches, slides_pred)
                with open(tmp / "history.csv", "w", newline="") as fh:
                    w = csv.DictWriter(fh, HISTORY_COLUMNS)
                    w.writeheader()
                    w.writerows(history)
                summary = {"slide_auroc": metrics["slide"].get("auroc") or float("nan"),
                           "patch_auroc": metrics["patch"].get("auroc") or float("nan")}
                tracker.scalars({f"test/{k}": v for k, v in summary.items()}, 0, step_key="test/step")
            finally:
                # Ctrl-C or SIGTERM: the run was killed, not failed
                tracker.close(summary, tmp if summary is not None else None,
                              stopped_by=sys.exc_info()[1])
                for s in stores:
                    s.close()
        if cache is not None:  # the results are in place: the finished folds are not needed
            cache.remove()
        return metrics
    finally:
        restore_caller_state(caller)


def load_classifier(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> FinetuneModel:
    """The final fine-tuned model of a ``finetune`` folder (encoder + head), in eval mode."""
    d = Path(out_dir)
    missing = not (d / "encoder.pt").is_file() or not (d / "classifier.pt").is_file()
    info = {} if missing else encoder_info(d / "encoder.pt")  # (its error named encoder.json)
    if missing or "classes" not in info:
        raise SimclrPathError(f"{d}: no fine-tuned classifier here (encoder.pt, classifier.pt); "
                              "run 'simclr-path finetune' with finetune.final_model: true")
    model = FinetuneModel(load_encoder(d / "encoder.pt", device="cpu"), len(info["classes"]))
    from simclr_path.model import load_state_dict_file

    try:
        model.head.load_state_dict(load_state_dict_file(d / "classifier.pt", "classifier file"))
    except RuntimeError as exc:  # keys or shapes of another head (torch's message is a page)
        raise SimclrPathError(
            f"{d / 'classifier.pt'}: not the linear head of this encoder and its "
            f"{len(info['classes'])} classes ({str(exc).splitlines()[0][:120]}); rerun "
            "'simclr-path finetune' with --force") from None
    return model.eval().to(device)

