"""Backbone factory (any timm model), encoder files and ``load_encoder``.

Encoder file format: ``encoder.pt`` is a plain timm state dict of the backbone built with
``num_classes=0`` (so ``timm.create_model(arch, num_classes=0)`` loads it strictly), and
``encoder.json`` beside it records ``arch``, ``num_features``, ``image_size`` and the patch
``mpp`` the encoder was trained at. All loading uses ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from simclr_path.errors import SimclrPathError
from simclr_path.outputs import atomic_output

ENCODER_FORMAT_VERSION = 1


def _unknown_arch(arch: str) -> SimclrPathError:
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list names with timm.list_models()"
    return SimclrPathError(f"unknown timm model {arch!r}{hint}")


def load_state_dict_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a tensor state dict safely (``weights_only=True``); one clear error if it is unreadable."""
    p = Path(path)
    if not p.is_file():
        raise SimclrPathError(f"{p}: {what} not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with code objects, truncated file ...
        raise SimclrPathError(f"{p}: cannot read {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SimclrPathError(f"{p}: {what} is not a state dict of tensors")
    return obj


def create_backbone(arch: str, pretrained: bool = False, weights: str | os.PathLike | None = None) -> nn.Module:
    """Create a timm backbone without classifier: ``model(x)`` maps (B, 3, H, W) -> (B, num_features).

    Args:
        arch: any name from ``timm.list_models()``.
        pretrained: download hub weights (needs network access).
        weights: a local state-dict file to start from; classifier keys are ignored.
    """
    if arch not in timm.list_models():
        raise _unknown_arch(arch)
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0)
    except Exception as exc:
        if pretrained:
            raise SimclrPathError(f"cannot fetch pretrained weights for {arch!r} ({exc}); "
                                  "set pretrained: false or pass a local weights file") from None
        raise
    if weights is not None:
        sd = load_state_dict_file(weights)
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if k in own}
        missing = [k for k in own if k not in sd]
        if not sd or len(missing) > len(own) // 2:
            raise SimclrPathError(f"{weights}: weights do not match timm model {arch!r} "
                                  f"({len(missing)} of {len(own)} tensors missing)")
        bad = [k for k in sd if sd[k].shape != own[k].shape]
        if bad:
            raise SimclrPathError(f"{weights}: tensor shapes do not match {arch!r} (first: {bad[0]})")
        model.load_state_dict(sd, strict=False)
    return model


def save_encoder(backbone: nn.Module, path: str | os.PathLike, arch: str, force: bool = False,
                 **meta: Any) -> Path:
    """Write ``encoder.pt`` (state dict) and ``encoder.json`` (arch, num_features, meta) atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    info = {"format_version": ENCODER_FORMAT_VERSION, "arch": arch,
            "num_features": int(getattr(backbone, "num_features", 0)), **meta}
    with atomic_output(path.with_suffix(".json"), force=force) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    with atomic_output(path, force=force) as tmp:
        torch.save(sd, tmp)
    return path


def encoder_info(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of an encoder file (from ``encoder.json`` beside it)."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        raise SimclrPathError(f"{side}: encoder metadata not found next to {Path(path).name}; "
                              "encoders written by 'simclr-path pretrain' have it")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise SimclrPathError(f"{side}: not valid JSON ({exc})") from None


def load_encoder(path: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a trained encoder: the timm backbone in eval mode, (B, 3, H, W) -> (B, num_features).

    Args:
        path: ``encoder.pt`` from a pretraining run directory (or the run directory itself).
        arch: timm name; read from ``encoder.json`` when omitted.
        device: where to put the model.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "encoder.pt"
    if not p.is_file():
        raise SimclrPathError(f"{p}: encoder file not found")
    if arch is None:
        arch = encoder_info(p)["arch"]
    model = create_backbone(arch)
    sd = load_state_dict_file(p, "encoder file")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise SimclrPathError(f"{p}: encoder does not match timm model {arch!r} "
                              f"({str(exc).splitlines()[0]})") from None
    return model.eval().to(device)
