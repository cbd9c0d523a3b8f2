"""Backbone factory (any timm model), encoder files and ``load_encoder``.

Encoder file format: ``encoder.pt`` is a plain timm state dict of the backbone built with
``num_classes=0`` (so ``timm.create_model(arch, num_classes=0)`` loads it strictly), and
``encoder.json`` beside it records ``arch``, ``num_features``, ``image_size`` and the patch
``mpp`` the encoder was trained at. All loading uses ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from simclr_path.errors import SimclrPathError, need_file
from simclr_path.outputs import atomic_output

ENCODER_FORMAT_VERSION = 1


def _unknown_arch(arch: str) -> SimclrPathError:
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list names with timm.list_models()"
    return SimclrPathError(f"unknown timm model {arch!r}{hint}")


_NOT_A_STATE_DICT = "save model.state_dict() with torch.save"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _safe_namespace() -> contextlib.AbstractContextManager:
    """Lets ``weights_only`` loads read an ``argparse.Namespace``: timm's training script saves
    its arguments as one beside the ``state_dict`` (a plain attribute bag, no code runs). A torch
    without ``safe_globals`` (before 2.5) keeps refusing such files."""
    import argparse

    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow else contextlib.nullcontext()


def load_state_dict_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a tensor state dict safely (``weights_only=True``); one clear error if it is unreadable."""
    p = need_file(path, what)
    try:
        with warnings.catch_warnings(), _safe_namespace():
            # torch's aside on a foreign pickle's protocol: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # a whole pickled model, a plain pickle or no torch file at all (JSON, text): torch's
        # own text is a page of advice to load untrusted code with weights_only=False
        raise SimclrPathError(f"{p}: cannot read {what}: not a state dict of tensors (a pickled "
                              f"model, or not a torch file); {_NOT_A_STATE_DICT}") from None
    except Exception as exc:  # noqa: BLE001  corrupt zip, truncated or empty file ...
        first = _ANSI.sub("", (str(exc).splitlines() or [""])[0])[:160]
        raise SimclrPathError(f"{p}: cannot read {what} ({type(exc).__name__}{': ' if first else ''}"
                              f"{first}); the file is truncated or damaged: copy or write it "
                              "again") from None
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SimclrPathError(f"{p}: {what} is not a state dict of tensors; {_NOT_A_STATE_DICT}")
    return obj


# key prefixes that wrap a backbone's own names: a simclr-path checkpoint's SimCLRModel
# ("backbone."), DDP ("module."), torch.compile ("_orig_mod.")
_WRAPPER_PREFIXES = ("backbone.", "module.", "_orig_mod.")


def _unwrap_keys(sd: dict[str, torch.Tensor], own: Any) -> dict[str, torch.Tensor]:
    """``sd`` with wrapper prefixes stripped while none of its keys is one of ``own``'s (the
    tensors under other prefixes, e.g. a checkpoint's projection head, are left out)."""
    while sd and not any(k in own for k in sd):
        for pre in _WRAPPER_PREFIXES:
            sub = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            if sub:
                sd = sub
                break
        else:
            break
    return sd


def _mismatch(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], strict: bool) -> str | None:
    """How ``sd`` fails to fit a model with state dict ``own`` (missing tensors, unexpected ones
    when ``strict``, shapes), naming the first of each; None when it fits."""
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd if k not in own] if strict else []
    shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(own)} tensors missing, first: {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, first: {extra[0]}")
    if shape:
        parts.append(f"{len(shape)} of other shapes, first: {shape[0]} "
                     f"{tuple(sd[shape[0]].shape)} vs {tuple(own[shape[0]].shape)}")
    return "; ".join(parts) or None


def feature_dim(backbone: nn.Module) -> int:
    """Width F of ``backbone(x)`` (B, F) for a timm model made with ``num_classes=0``: timm's
    ``head_hidden_size`` where a layer follows the pooling (MobileNetV3: 1024 outputs from 288
    ``num_features``), else ``num_features`` (0 when the model states neither)."""
    return int(getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", 0))


def _classifier_keys(arch: str, own: dict[str, torch.Tensor]) -> set[str]:
    """Names of the tensors timm's ``arch`` has with its classifier and lacks without it
    (``fc.weight``, ``head.fc.bias`` ...), from a model built on the meta device (no memory,
    no initialisation)."""
    try:
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False)
    except Exception:  # noqa: BLE001 -- a model whose constructor needs real tensors
        full = timm.create_model(arch, pretrained=False)
    return set(full.state_dict()) - set(own)


def create_backbone(arch: str, pretrained: bool = False, weights: str | os.PathLike | None = None) -> nn.Module:
    """Create a timm backbone without classifier: ``model(x)`` maps (B, 3, H, W) -> (B, F), with
    F = :func:`feature_dim`.

    Args:
        arch: any timm model name (``timm.list_models()``), optionally with a weights tag
            (``resnet50.tv_in1k``).
        pretrained: download hub weights (needs network access).
        weights: a local state-dict file to start from; classifier keys are ignored.
    """
    if not timm.is_model(arch):
        raise _unknown_arch(arch)
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0)
    except Exception as exc:
        if pretrained:
            raise SimclrPathError(f"cannot fetch pretrained weights for {arch!r} ({exc}); "
                                  "set pretrained: false or pass a local weights file") from None
        raise
    if weights is not None:
        own = model.state_dict()
        sd = _unwrap_keys(load_state_dict_file(weights), own)
        # the file's classifier is the one thing left out: every other tensor must fit, both
        # ways. A partial match (resnet50 weights for a resnet101) would leave part of the
        # backbone at random, and a deeper model's weights (resnet34's for a resnet18) would
        # build a network out of another one's first layers, each without a word
        classifier = _classifier_keys(arch, own) if any(k not in own for k in sd) else set()
        sd = {k: v for k, v in sd.items() if k not in classifier}
        why = _mismatch(sd, own, strict=True)
        if why:
            raise SimclrPathError(f"{weights}: weights do not match timm model {arch!r} ({why}); "
                                  "give weights of this architecture")
        model.load_state_dict(sd, strict=False)
    return model


def save_encoder(backbone: nn.Module, path: str | os.PathLike, arch: str, force: bool = False,
                 **meta: Any) -> Path:
    """Write ``encoder.pt`` (state dict) and ``encoder.json`` (arch, num_features, meta) atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    info = {"format_version": ENCODER_FORMAT_VERSION, "arch": arch,
            "num_features": feature_dim(backbone), **meta}
    with atomic_output(path.with_suffix(".json"), force=force) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    with atomic_output(path, force=force) as tmp:
        torch.save(sd, tmp)
    return path


def encoder_info(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of an encoder file (from ``encoder.json`` beside it)."""
    from simclr_path.outputs import HDF5_SUFFIXES

    if Path(path).suffix.lower() in HDF5_SUFFIXES:  # a patch store where the encoder goes
        raise SimclrPathError(f"{path}: is an HDF5 file (a patch store or embedding file?), not an "
                              "encoder; give the encoder.pt of a pretraining run (in Python, "
                              "embed_store takes the encoder first, then the store)")
    side = need_file(Path(path).with_suffix(".json"), f"encoder metadata of {Path(path).name}",
                     "encoders written by 'simclr-path pretrain' have it beside them")
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SimclrPathError(f"{side}: not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise SimclrPathError(f"{side}: not a text file; encoders written by 'simclr-path "
                              "pretrain' have a JSON one") from None
    if not isinstance(info, dict):
        raise SimclrPathError(f"{side}: expected a JSON object of encoder metadata, got a "
                              f"{type(info).__name__}; encoders written by 'simclr-path pretrain' have one")
    if not isinstance(info.get("arch"), str) or not info["arch"].strip():
        raise SimclrPathError(f"{side}: no model name ('arch', e.g. \"resnet18\"); encoders "
                              "written by 'simclr-path pretrain' record it")
    version = info.get("format_version")
    if isinstance(version, (int, float)) and not isinstance(version, bool) and \
            version > ENCODER_FORMAT_VERSION:  # keys a newer format may mean otherwise
        raise SimclrPathError(f"{side}: encoder format {version:g} is newer than this "
                              f"simclr-path's ({ENCODER_FORMAT_VERSION}); upgrade simclr-path")
    problem = _info_problem(info)
    if problem:  # the stages compute with these: a wrong type was a traceback deep inside
        raise SimclrPathError(f"{side}: {problem}; encoders written by 'simclr-path pretrain' "
                              "record it right (write it again, or remove the key)")
    return info


def _info_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with the keys of encoder metadata that the stages compute with."""
    import math

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    v = info.get("format_version")
    if v is not None and not (number(v) and float(v).is_integer()):
        return f"format_version {v!r} is not a version number"
    for key, lo, hi in (("image_size", 8, 4096), ("patch_size", 8, 4096)):
        v = info.get(key)
        if v is not None and not (number(v) and float(v).is_integer() and lo <= v <= hi):
            return f"{key} {v!r} is not a whole number of pixels between {lo} and {hi}"
    v = info.get("mpp")
    if v is not None and not (number(v) and 0 < v <= 1000):
        return f"mpp {v!r} is not a positive number of microns per pixel"
    v = info.get("crop_scale")
    if v is not None and not (isinstance(v, list) and len(v) == 2 and all(map(number, v))
                              and 0 < v[0] <= v[1] <= 1):
        return f"crop_scale {v!r} is not a pair 0 < low <= high <= 1"
    return None


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
    need_file(p, "encoder file")
    if arch is None:
        arch = encoder_info(p)["arch"]
    model = create_backbone(arch)
    own = model.state_dict()
    sd = _unwrap_keys(load_state_dict_file(p, "encoder file"), own)
    why = _mismatch(sd, own, strict=True)
    if why:  # torch's own message names no tensor on its first line
        raise SimclrPathError(f"{p}: encoder does not match timm model {arch!r} ({why}); give "
                              f"the encoder.pt written with its encoder.json")
    # strict=False: _mismatch checked every tensor but the num_batches_tracked counters
    model.load_state_dict(sd, strict=False)
    return model.eval().to(device)


def output_stride(backbone: nn.Module) -> int | None:
    """Input pixels per pixel of the backbone's last feature map (timm ``feature_info``; 32 for
    ResNets), or None when the model does not say."""
    info = getattr(backbone, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# SimCLR projection head and model
# ----------------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """SimCLR projection head g(.): (B, in_dim) -> (B, out_dim).

    ``layers`` = 0: identity (the loss sees the backbone features; out_dim = in_dim); 1: one linear
    layer; 2: Linear-BN-ReLU-Linear as in SimCLR (Chen et al. 2020); 3: two hidden blocks as in
    SimCLRv2 (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised
    Learners"). ``batchnorm`` adds BatchNorm1d after each hidden linear layer (whose bias is then
    redundant and dropped).
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, layers: int = 2,
                 batchnorm: bool = True) -> None:
        super().__init__()
        if layers not in (0, 1, 2, 3):
            raise ValueError(f"layers must be 0, 1, 2 or 3, got {layers}")
        hidden_dim = int(hidden_dim or in_dim)
        self.in_dim, self.hidden_dim, self.layers, self.batchnorm = int(in_dim), hidden_dim, layers, batchnorm
        self.out_dim = int(in_dim) if layers == 0 else int(out_dim)
        blocks: list[nn.Module] = []
        d = self.in_dim
        for _ in range(max(0, layers - 1)):
            blocks.append(nn.Linear(d, hidden_dim, bias=not batchnorm))
            if batchnorm:
                blocks.append(nn.BatchNorm1d(hidden_dim))
            blocks.append(nn.ReLU(inplace=True))
            d = hidden_dim
        if layers >= 1:
            blocks.append(nn.Linear(d, self.out_dim))
        self.net = nn.Sequential(*blocks) if blocks else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, in_dim) -> z: (B, out_dim)."""
        return self.net(h)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in ``encoder.json`` as ``head``)."""
        return {"in_dim": self.in_dim, "hidden_dim": self.hidden_dim, "out_dim": self.out_dim,
                "layers": self.layers, "batchnorm": self.batchnorm}


class SimCLRModel(nn.Module):
    """Backbone f(.) plus projection head g(.): (B, 3, H, W) -> (h (B, F), z (B, D))."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``more``: batches at other sizes (multi-crop's local views, (B_i, 3, h_i, w_i)). Each
        size goes through the backbone on its own and all features through the head together,
        as in SwAV (Caron et al. 2020): h (B + sum B_i, F), z (B + sum B_i, D), rows in order."""
        h = self.backbone(x)
        if more:
            h = torch.cat([h, *(self.backbone(m) for m in more)])
        return h, self.head(h)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Batch norms -> synchronised ones (statistics over the global batch under DDP).

    timm's converter, not ``nn.SyncBatchNorm.convert_sync_batchnorm``: timm models built from
    ``BatchNormAct2d`` (RegNet, EfficientNet, MobileNetV3, ...) fuse batch norm and activation
    in one layer, and torch's converter replaces it with a plain SyncBatchNorm, so the
    activation is silently never applied (71 of them in regnetx_004). State-dict keys are kept.
    """
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradient over processes too (as
    ``torch.distributed.nn.functional.all_reduce``, which PyTorch deprecates with a
    FutureWarning in every process of every run)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm of ``x`` (N, C, ...) with the statistics of every process's batch.

    Mean first, then the variance about it (two small all-reduces; E[x^2] - E[x]^2 loses
    precision in float32), both with gradients, in float32. The running statistics are
    updated as ``nn.BatchNorm`` does (unbiased variance, ``momentum`` or the cumulative mean).
    """
    c = x.shape[1]
    dims = [0, *range(2, x.ndim)]
    shape = (1, c) + (1,) * (x.ndim - 2)
    # all_reduce with a gradient whose backward sums over processes too, as loss.GatherLayer
    # does, so that with DDP's averaging each process gets the gradient of the mean loss
    all_reduce = _AllReduceSum.apply
    xf = x.float()
    summed = all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / c])]))
    n = summed[c]
    mean = summed[:c] / n
    centred = xf - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / n
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), f)
            unbiased = var.detach() * (n / torch.clamp(n - 1, min=1))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), f)
    y = centred * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class _GlobalStats:
    """Batch-norm layers that normalise over the global batch in training under
    ``torch.distributed`` with any backend (gloo too), and as their base class otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _several_processes()):
            return super().forward(x)  # type: ignore[misc]
        y = _global_batch_norm(self, x)  # type: ignore[arg-type]
        if hasattr(self, "act"):  # timm's BatchNormAct2d: batch norm, dropout, activation
            y = self.act(self.drop(y))
        return y


class GlobalBatchNorm1d(_GlobalStats, nn.BatchNorm1d):
    """:class:`nn.BatchNorm1d` with global-batch statistics under several processes."""


class GlobalBatchNorm2d(_GlobalStats, nn.BatchNorm2d):
    """:class:`nn.BatchNorm2d` with global-batch statistics under several processes."""


class GlobalBatchNormAct2d(_GlobalStats, BatchNormAct2d):
    """timm's BatchNormAct2d (RegNet, EfficientNet, ...) with global-batch statistics under
    several processes."""


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d,
           BatchNormAct2d: GlobalBatchNormAct2d}


def global_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """Batch norms -> ones with statistics over the global batch, for CPU processes (gloo), where
    ``nn.SyncBatchNorm`` does not run: without it each process normalised over its own share
    of the batch, and SimCLR can tell a positive pair by its process's statistics (Chen et al.
    2020, section 2.3, "Global BN"). The layers keep their parameters, buffers and state-dict
    keys (their class is swapped in place). Returns the model and the number of batch-norm layers
    of other kinds, left with per-process statistics."""
    others = 0
    for m in model.modules():
        if type(m) in _GLOBAL:
            m.__class__ = _GLOBAL[type(m)]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _GlobalStats):
            others += 1
    return model, others


def create_simclr_model(cfg: Any) -> SimCLRModel:
    """Backbone and head from a :class:`~simclr_path.config.ModelConfig`."""
    backbone = create_backbone(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights)
    head = ProjectionHead(feature_dim(backbone), cfg.head_hidden_dim, cfg.head_out_dim,
                          cfg.head_layers, cfg.head_batchnorm)
    return SimCLRModel(backbone, head)


def save_projection_head(head: ProjectionHead, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``head.pt`` (a state dict of tensors) atomically."""
    sd = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_output(path, force=force) as tmp:
        torch.save(sd, tmp)
    return Path(path)


def load_projection_head(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ProjectionHead:
    """The trained projection head of a pretraining run, in eval mode: (B, F) -> (B, D).

    Reads ``head.pt`` and the ``head`` entry of ``encoder.json`` in ``run_dir`` (a run directory,
    or its ``encoder.pt``). With ``layers = 0`` the head is the identity.
    """
    d = Path(run_dir)
    if d.is_file():
        d = d.parent
    info = encoder_info(d / "encoder.pt")
    spec = info.get("head")
    if not isinstance(spec, dict):
        raise SimclrPathError(f"{d / 'encoder.json'}: no projection head recorded; "
                              "the run was not written by 'simclr-path pretrain'")
    head = ProjectionHead(spec["in_dim"], spec.get("hidden_dim"), spec["out_dim"], spec["layers"],
                          spec.get("batchnorm", True))
    sd = load_state_dict_file(d / "head.pt", "projection head file") if spec["layers"] > 0 else {}
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise SimclrPathError(f"{d / 'head.pt'}: does not match the head in encoder.json "
                              f"({str(exc).splitlines()[0]})") from None
    return head.eval().to(device)
