"""SimCLR pretraining (``simclr-path pretrain``): the loop, checkpoints, resume, run directory.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations":
two augmented views of each patch (plus K small local views with multi-crop, Caron et al. 2020),
a timm backbone f and projection head g, NT-Xent on g(f(x)), LARS with linear LR scaling, warm-up
then cosine decay.

Run directory (``--out RUN_DIR``)::

    config.yaml    resolved configuration (written first)
    metrics.csv    step, epoch, loss, lr, pairs_per_s, data_time_s, compute_time_s (one row a step)
    checkpoint.pt  model, head, optimiser, scheduler, grad scaler, RNG states, step, stores
                   (atomic; every train.checkpoint_every steps, at the end, on Ctrl-C / SIGTERM)
    loss.png       loss and LR curves
    head.pt        projection head state dict (see model.load_projection_head)
    encoder.pt     backbone only, a plain timm state dict; encoder.json its metadata
    summary.json   steps, epochs, wall time, pairs/s, final loss -- written last: a run directory
                   without it is not complete
    tensorboard/   TensorBoard event files (train.tensorboard)
    mlflow.db      MLflow's SQLite store and mlruns/ its artifacts (train.mlflow, when mlflow is
                   installed and no train.mlflow_uri names another store)
    wandb/         Weights & Biases run files (train.wandb, when wandb is installed)

With ``train.time_budget_s`` the LR schedule is re-planned from the measured step rate to end
at the budget, and with ``train.budget_min_steps`` too the views are first fitted to the budget
(:mod:`simclr_path.budget`).

Processes: run plainly for one CPU or GPU, or under ``torchrun`` for several GPUs or nodes
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from the environment; NCCL on CUDA, gloo on CPU). Each
process trains on its own slice of every global batch; NT-Xent negatives come from all processes
(:mod:`simclr_path.loss`); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from simclr_path import __version__
from simclr_path.config import (
    SPEED_KEYS,
    AugmentConfig,
    PipelineConfig,
    TrainConfig,
    defaults_dict,
    to_dict,
    whole_cfg,
)
from simclr_path.errors import SimclrPathError
from simclr_path.outputs import (
    FINETUNE_MARKER,
    RUN_MARKER,
    atomic_output,
    check_apart,
    raise_pending_signal,
    stopping_on_a_signal,
    worker_reports_back,
)

CHECKPOINT_VERSION = 1
METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "pairs_per_s", "data_time_s", "compute_time_s"]
# Files a run writes; --force removes exactly these (never other files of the folder).
RUN_FILES = ["config.yaml", "metrics.csv", "checkpoint.pt", "loss.png", "head.pt", "encoder.pt",
             "encoder.json", "summary.json", "mlflow.db"]
RUN_DIRS = ["tensorboard", "mlruns", "wandb"]
# config.yaml's first line: tells a run's own config.yaml from a user's in a folder given as --out
RUN_CONFIG_HEADER = ("# simclr-path pretrain: this run's resolved configuration; pretraining read its\n"
                     "# augment, model and train sections (the others: what it was given)\n")
# Files that mark a run as finished; removed before any (re)start so a failed run never has them.
COMPLETE_FILES = ["summary.json", "encoder.pt", "encoder.json", "head.pt", "loss.png"]


def _diverged_fix(t_cfg: Any) -> str:
    """What to change after a diverged run: the settings it does not already have."""
    fixes = ["lower train.lr"]
    if t_cfg.optimizer != "adamw":
        fixes.append("use train.optimizer adamw")
    if t_cfg.amp:
        fixes.append("set train.amp false")
    return fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"


# ----------------------------------------------------------------------------------------------
# Devices and processes
# ----------------------------------------------------------------------------------------------
class Dist:
    """This process's place in a torchrun job (or a single process)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.initialized_here = False
        # every rank left at one agreed point (the run's end or an agreed interrupt), so none is
        # inside a collective and the group may be ended
        self.stopped_together = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if device.type == "cuda" and self.enabled:
            # NCCL collectives (the first barrier included) and pinned-memory threads use the
            # current device: without this every rank would work on cuda:0 (also when a caller
            # made the process group)
            torch.cuda.set_device(device)
        if not self.enabled or (dist.is_available() and dist.is_initialized()):
            return
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", init_method="env://", device_id=device)
        else:
            dist.init_process_group(backend="gloo", init_method="env://")
        self.initialized_here = True

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """End the process group made here, where all ranks stopped together. After a failure
        other ranks may be inside a collective, where tearing the group down can block this rank
        too (torchtitan#1342): then it is left to the process's exit, and torchrun ends the
        other ranks."""
        if self.initialized_here and dist.is_initialized() and self.stopped_together:
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device; ``cuda`` without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SimclrPathError("--device cuda: no CUDA GPU is available to PyTorch "
                              f"(torch {torch.__version__}); use --device cpu or --device auto")
    if name not in ("auto", "cpu", "cuda"):
        raise SimclrPathError(f"--device {name}: expected auto, cpu or cuda")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if per_node > gpus:  # two ranks on one GPU: NCCL fails at start-up with an unclear error
        raise SimclrPathError(f"torchrun started {per_node} processes on this node but it has "
                              f"{gpus} GPU(s); set --nproc_per_node to at most {gpus}")
    return torch.device("cuda", local_rank % gpus)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), so CPU autocast pays off."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: no probe, stay with float32
        return False


def amp_mode(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``, or None for float32.

    CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler). CPU: bf16 only on CPUs
    with native bf16 instructions (AVX512-BF16 / AMX): there bf16 autocast trained ResNet-18/50
    1.7-2.0x faster than float32 (``benchmarks/bench_train.py``); without them bf16 is emulated
    by conversions and brings no speed-up, so ``amp`` falls back to float32 there.
    """
    if not cfg.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 or later (Ampere, Hopper, ...). On older GPUs
    (V100, T4) ``torch.cuda.is_bf16_supported()`` is True too, through emulation, which is slower
    than float32; fp16 with a GradScaler is their fast mixed precision."""
    return torch.cuda.get_device_capability(device)[0] >= 8


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """Base LR (quoted at batch 256) scaled with the global batch (Goyal et al. 2017; SimCLR)."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch / 256.0
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(global_batch / 256.0)
    return cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (neither).

    As in SimCLR, biases and batch-norm parameters (every tensor with ndim <= 1) are excluded from
    weight decay and from the LARS trust ratio.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "adapt": False}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lars":
        from timm.optim import Lars

        for g in groups:  # timm's Lars adapts a group when weight_decay != 0 or always_adapt
            g["always_adapt"] = g.pop("adapt")
        return Lars(groups, lr=lr, momentum=cfg.momentum, trust_coeff=0.001)
    for g in groups:
        g.pop("adapt")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up from 0, then cosine decay towards 0, stepped once per optimiser step.

    Step ``s`` (0-based) trains at the schedule's value at ``s + 1`` (the loop calls
    ``step_update(s + 1)``), so the first step is not spent at LR 0; the cosine is one step
    longer than the decay for the same reason at the other end: it reaches 0 one step after the
    last, where the last step would otherwise train at LR 0.
    """
    import logging

    from timm.scheduler import CosineLRScheduler

    # a one-step decay is what a run of a few steps asks for, not a mistake to warn about
    log = logging.getLogger("timm.scheduler.cosine_lr")
    level = log.level
    if total_steps - warmup_steps <= 1:
        log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=total_steps - warmup_steps + 1,
                                 lr_min=0.0, warmup_t=warmup_steps, warmup_lr_init=0.0,
                                 warmup_prefix=True, t_in_epochs=False)
    finally:
        log.setLevel(level)


def replan_scheduler(scheduler, total_steps: int, warmup_steps: int) -> None:
    """Give a :func:`build_scheduler` schedule a new length, in place: afterwards it equals
    ``build_scheduler(optimizer, total_steps, min(warmup_steps, total_steps // 2))``.

    Used under a time budget, where the run length is only known once the step rate is measured.
    """
    warm = min(warmup_steps, total_steps // 2)
    scheduler.t_initial = total_steps - warm + 1  # as build_scheduler's
    scheduler.warmup_t = warm
    scheduler.warmup_steps = ([(v - scheduler.warmup_lr_init) / warm for v in scheduler.base_values]
                              if warm else [1 for _ in scheduler.base_values])


# train keys a resume must keep: the optimiser and LR schedule are restored from the checkpoint,
# and the loss defines the run (max_steps, epochs and the time budget may change: the schedule is
# re-planned; batch_size is checked as the global batch)
RESUME_FIXED_TRAIN_KEYS = ("optimizer", "lr", "lr_scaling", "weight_decay", "momentum",
                           "warmup_epochs", "temperature", "loss", "drop_nearest", "hard_beta",
                           "ema_decay", "seed")


# Seconds between progress lines where no terminal shows the progress bar (a log file)
LOG_LINE_S = 60.0


# Time budget: the first steps (DataLoader start-up, first allocations) are left out of the step
# rate, and the schedule is re-planned once a few steps have been measured.
BUDGET_SKIP_STEPS = 2
BUDGET_MIN_STEPS = 3


def _seconds(s: float) -> str:
    """Seconds for a message: whole ones, with decimals below 10 (a 0.2 s budget is not 0 s)."""
    return f"{s:.0f}" if s >= 10 else f"{s:.2g}"


def budget_steps(step: int, elapsed: float, ref: tuple[int, float], budget: float, cap: int) -> int | None:
    """The step a run can reach within ``budget`` seconds, at the mean step rate since ``ref``.

    Args:
        step, elapsed: steps done and seconds since the start of this invocation.
        ref: (step, elapsed) where the rate measurement started.
        budget: the time budget in seconds.
        cap: never plan beyond this (the epochs / max_steps length).

    Returns:
        ``step <= planned <= cap``, or None while fewer than ``BUDGET_MIN_STEPS`` steps are measured.
    """
    ref_step, ref_t = ref
    if step - ref_step < BUDGET_MIN_STEPS or elapsed <= ref_t:
        return None
    rate = (step - ref_step) / (elapsed - ref_t)  # steps per second
    return int(min(cap, step + max(0.0, budget - elapsed) * rate))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and primitive types (loadable with ``weights_only=True``)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_complete(out: Path) -> bool:
    """Whether ``out`` holds every file of a finished run directory."""
    return all((out / n).is_file() for n in COMPLETE_FILES)


def caller_state() -> dict[str, Any]:
    """The process-wide state a stage changes for its own run: the global RNGs (Python, NumPy,
    torch's CPU generator and CUDA's where initialised) and the CUDA math flags; see
    :func:`restore_caller_state`."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None,
            "seed": torch.initial_seed(),
            "flags": (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                      torch.backends.cudnn.allow_tf32)}


def restore_caller_state(state: dict[str, Any]) -> None:
    """Put back what :func:`caller_state` saved: a Python caller's later random draws must not
    depend on having trained (pretrain seeded the global generators with train.seed), nor its
    float32 matmuls run in TF32 because a run on a GPU turned it on."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        # CUDA started during the stage: its generators as the caller's seed would have made
        # them (torch.manual_seed seeds CUDA's lazily), not as train.seed left them
        torch.cuda.manual_seed_all(state["seed"])
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = state["flags"]


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Give a process other than rank 0 its own torch RNG stream (CPU and CUDA).

    Every process seeds alike so that the model starts alike, and resume restores rank 0's
    saved state on every process; without this, dropout and drop-path would draw the same masks
    on every rank. Rank 0 keeps the configured seed's stream (a single process is unchanged);
    the others' streams derive from (seed, rank, step), so a resumed run is reproducible.
    """
    if rank:
        torch.manual_seed((int(seed) * 1_000_003 + int(rank) * 7_919 + int(step)) % 2**63)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half checkpoint."""
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; one clear error when it is unusable."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, foreign pickle ...
        raise SimclrPathError(f"{path}: cannot read checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); delete it "
                              "and rerun without --resume, or with --force") from None
    need = {"format_version", "step", "model", "optimizer", "scheduler", "config"}
    if not isinstance(ck, dict) or not need <= set(ck):
        raise SimclrPathError(f"{path}: not a simclr-path checkpoint; rerun without --resume or "
                              "with --force")
    return ck


def _unwrap(model: nn.Module) -> nn.Module:
    m = getattr(model, "_orig_mod", model)  # torch.compile
    m = getattr(m, "module", m)  # DDP
    return getattr(m, "_orig_mod", m)


# ----------------------------------------------------------------------------------------------
# Run directory
# ----------------------------------------------------------------------------------------------
def _check_run_dir(out: Path, resume: bool, force: bool) -> None:
    """The user errors of RUN_DIR, read-only: every DDP rank checks before the process group
    starts, so that all stop with the message (rank 0 alone would leave the others waiting in
    a collective until NCCL's watchdog ends the job, minutes later, without it)."""
    if out.exists() and not out.is_dir():
        raise SimclrPathError(f"{out}: exists and is not a directory; choose another --out")
    if not (out.is_dir() and any(out.iterdir())):
        return
    marker = out / RUN_MARKER
    if marker.exists() and not marker.is_symlink() and not marker.is_file():
        raise SimclrPathError(f"{marker}: exists and is not a file (a folder?); every run writes "
                              "this marker file, so remove it or choose another --out")
    if not force and not resume:
        raise SimclrPathError(
            f"{out}: run directory exists and is not empty; "
            + ("pass --resume to continue its checkpoint or --force to start over"
               if (out / "checkpoint.pt").is_file() else
               "it has no checkpoint to resume, so pass --force to start over"))
    if not _is_run_dir(out):  # --force and --resume remove run files and tracking folders
        raise SimclrPathError(f"{out}: exists and is not a pretraining run directory (no "
                              f"{RUN_MARKER} file, which every run writes first, nor a "
                              "simclr-path checkpoint.pt); --force and --resume act only on "
                              "runs, so choose another --out")


def _is_run_dir(out: Path) -> bool:
    """Whether ``out`` is a run's folder: a folder given by mistake (a project folder with its
    own config.yaml, metrics.csv, mlruns/ and mlflow.db, maybe an encoder or a config copied
    from a run) must not lose them to --force. The marker every run writes first says so; a
    run from before the marker (2026-12-06) has its checkpoint to show. A fine-tuning results
    folder never is one (it holds an encoder.pt of its own)."""
    if (out / FINETUNE_MARKER).exists():
        return False
    if (out / RUN_MARKER).is_file():
        return True
    if not (out / "checkpoint.pt").is_file():
        return False
    try:
        load_checkpoint(out / "checkpoint.pt")
    except SimclrPathError:
        return False
    return True


def _differences(section: str, was: dict[str, Any], now: dict[str, Any]) -> str:
    """``section.key (old, now new)`` for the keys that differ (the first four)."""
    keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    out = ", ".join(f"{section}.{k} ({was.get(k)!r}, now {now.get(k)!r})" for k in keys[:4])
    return out + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _requested(cfg: PipelineConfig) -> str:
    """What defines a run, as asked for (before views are fitted to a time budget): the
    augment, model and train sections less the speed keys (``config.SPEED_KEYS``), as JSON."""
    d = to_dict(cfg)
    train = {k: v for k, v in d["train"].items() if k not in SPEED_KEYS["train"]}
    return json.dumps({"augment": d["augment"], "model": d["model"], "train": train},
                      sort_keys=True)


def _interrupted_checkpoint(path: Path, requested: str, stores: Any, world_size: int,
                            force: bool, main: bool) -> dict[str, Any] | None:
    """``path`` loaded when it holds an unfinished run of ``requested`` on ``stores`` with
    ``world_size`` processes (the configuration fixes everything else a resume checks); else
    None, with a warning that says why the run starts over (no warning without a checkpoint),
    or, without ``force``, an error saying why it cannot be continued."""
    if not path.is_file():
        return None
    why = None
    try:
        ck = load_checkpoint(path)
    except SimclrPathError as exc:
        ck, why = None, f"unreadable ({str(exc).split(': ', 1)[-1].split(';')[0]})"
    if ck is not None:
        # finished (or from a version that did not say); a run killed while writing its final
        # files (the checkpoint says finished, summary.json is missing, and the marker does not
        # say the run completed) only needs those
        complete = _run_complete(path.parent) or _finished_in_marker(path.parent, ck)
        if ck.get("finished") is None or ck.get("finished") and complete:
            why = "of a finished run"
        elif ck.get("requested") != requested:
            try:
                was, now = json.loads(ck["requested"]), json.loads(requested)
                why = "of another configuration: " + ", ".join(
                    _differences(s, was.get(s, {}), now[s]) for s in now
                    if was.get(s, {}) != now[s])
            except (TypeError, ValueError, KeyError, AttributeError):  # an older checkpoint's record
                why = "of another configuration"
        elif ck.get("stores") != stores:
            why = "of other patch stores"
        elif int(ck.get("world_size", 1)) != world_size:  # the global batch would differ
            why = f"of {int(ck.get('world_size', 1))} processes, not {world_size}"
        elif any(os.stat(r["path"]).st_mtime > os.stat(path).st_mtime for r in stores):
            why = "older than its patch stores (written again since)"
        elif _other_weights(json.loads(requested)["model"].get("weights"), ck, path):
            # the request names the weights' path, not the weights: new ones must train again
            why = "of other initial weights (the model.weights file has changed since)"
    if why is None:
        if main:
            print(f"{path}: resuming the interrupted run at step {ck['step']}", file=sys.stderr,
                  flush=True)
        return ck
    if not force:
        raise SimclrPathError(f"{path}: checkpoint {why}, so it is not continued; pass --force "
                              "to start over")
    if main:
        warnings.warn(f"{path}: checkpoint {why}; starting over", stacklevel=3)
    return None


def _prepare_run_dir(out: Path, resume: bool, force: bool) -> bool:
    """Clean RUN_DIR (checked by :func:`_check_run_dir`); return True when a checkpoint will be
    resumed (rank 0 only)."""
    has_ckpt = (out / "checkpoint.pt").is_file()
    nonempty = out.is_dir() and any(out.iterdir())
    if resume and has_ckpt:
        for name in COMPLETE_FILES:  # a resumed run is incomplete until it finishes again
            (out / name).unlink(missing_ok=True)
        _mark_run_dir(out)
        return True
    if nonempty and not resume and force or (resume and not has_ckpt):
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _mark_run_dir(out)
    return False


def _mark_run_dir(out: Path) -> None:
    """Mark ``out`` as a run directory before anything else is written: a run that failed early
    leaves tracking folders only, and a workflow deletes a failed job's declared outputs
    (config.yaml, metrics.csv ...), yet --force must still take the folder for a run's."""
    marker = out / RUN_MARKER
    if marker.is_symlink():  # never written through: a link could point anywhere
        marker.unlink()
    if not marker.is_file():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(marker, flags, 0o644), "w") as f:
            f.write(_MARKER_TEXT)


_MARKER_TEXT = "a simclr-path pretraining run directory (--force replaces its files)\n"
_FINISHED = "finished: "


def _other_weights(file: str | None, ck: dict[str, Any], checkpoint: Path) -> bool:
    """Whether the initial weights ``file`` (when given and there) differ from those the run
    in ``ck`` started from: by content (a copy moved into place keeps an old file time), or
    for a checkpoint from before that was recorded, by file time."""
    from simclr_path.embed import file_sha256

    try:
        if not file:
            return False
        if ck.get("weights_sha256"):
            return file_sha256(file) != ck["weights_sha256"]
        return os.stat(file).st_mtime > os.stat(checkpoint).st_mtime
    except OSError:  # gone: creating the model says so
        return False


def _record_finished(out: Path, step: int, wall: float) -> None:
    """Note in the run's marker which checkpoint completed the run (its step and wall time),
    once every final file is written. A workflow deletes a job's declared outputs before it
    reruns it, so a finished checkpoint without summary.json looked like a run killed while
    writing its final files, and --forcerun (or new initial weights) gave the old encoder back
    instead of training again; the marker is no declared output, so the note survives."""
    _write_text(out / RUN_MARKER,
                _MARKER_TEXT + _FINISHED + json.dumps({"step": step, "wall_time_s": wall}) + "\n")


def _finished_in_marker(out: Path, ck: dict[str, Any]) -> bool:
    """Whether the run's marker says that checkpoint ``ck`` completed the run."""
    try:
        lines = (out / RUN_MARKER).read_text().splitlines()
        done = [json.loads(x[len(_FINISHED):]) for x in lines if x.startswith(_FINISHED)]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return any(isinstance(d, dict) and d.get("step") == ck.get("step")
               and d.get("wall_time_s") == ck.get("wall_time_s") for d in done)


def _resume_without_checkpoint(out: Path, force: bool, main: bool) -> None:
    """--resume and no ``out/checkpoint.pt``: a fresh start, which removes the run's files. A
    finished run (its checkpoint deleted to save space, say) is not thrown away without --force;
    otherwise say that nothing is resumed, since the run starts from step 0."""
    finished = [n for n in COMPLETE_FILES if (out / n).is_file()]
    if finished and not force:
        raise SimclrPathError(f"{out}: holds a finished run ({', '.join(finished)}) but no "
                              "checkpoint.pt to resume; pass --force to start over (its run files "
                              "are replaced) or choose another --out")
    if main:
        warnings.warn(f"--resume: no checkpoint in {out}; starting from step 0", stacklevel=3)


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)


class _Metrics:
    """metrics.csv, appended a window at a time; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None, saved: str | None = None) -> None:
        """``saved``: the checkpoint's copy of the file, used when the file itself is gone."""
        self.path = path
        rows: list[list[str]] = []
        if resume_step is not None and (path.is_file() or saved):
            text = path.read_text() if path.is_file() else saved
            rd = csv.reader(io.StringIO(text, newline=""))
            if next(rd, None) == METRIC_COLUMNS:
                rows = [r for r in rd if r and int(r[0]) <= resume_step]
        # a fresh temporary name (atomic_output) and appends that do not follow a link: a link
        # planted at a fixed name in a shared run folder made the run write over its target
        with atomic_output(path, force=True) as tmp, tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(METRIC_COLUMNS)
            w.writerows(rows)
        self.last_loss = float(rows[-1][2]) if rows else float("nan")

    def append(self, rows: list[list[Any]]) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(self.path, flags, 0o666), "a", newline="") as f:
            csv.writer(f).writerows(rows)
        if rows:
            self.last_loss = float(rows[-1][2])


class _Tracker:
    """Optional experiment tracking of a run directory ``out``.

    TensorBoard event files in ``out/tensorboard`` (train.tensorboard, on by default); MLflow
    (train.mlflow: a SQLite store ``out/mlflow.db`` with artifacts in ``out/mlruns``, MLflow's
    own default backend since its file store was retired, unless train.mlflow_uri) and Weights &
    Biases (train.wandb: files in ``out/wandb``, offline by default, ``wandb sync`` uploads them
    later) when enabled and installed. A backend that is not installed, or fails (a server
    down, a store it cannot open), gives one warning and is dropped, so tracking never stops
    training. MLflow is driven through an ``MlflowClient`` of its own, so a caller's active
    MLflow run and tracking URI are left alone. :meth:`close` ends every backend and may be
    called more than once.
    """

    def __init__(self, out: Path, cfg: PipelineConfig, enabled: bool,
                 name: str | None = None, resume_step: int | None = None,
                 moves_to: Path | None = None) -> None:
        """``name``: the run's name in MLflow and W&B (default ``out.name``). ``resume_step``:
        the checkpoint's step of a resumed run; TensorBoard drops what the interrupted run
        logged after it (as metrics.csv does), so those steps are not shown twice.
        ``moves_to``: where ``out``, a temporary folder (fine-tuning's), is renamed after
        :meth:`close`; the local MLflow store then records its artifacts there."""
        self.tb = None
        self.mlflow = None
        self.wandb = None  # the wandb Run
        self.moves_to = moves_to
        self.local_store: Path | None = None  # out/mlflow.db when MLflow logs there
        if not enabled:
            return
        t = cfg.train
        if t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    log_dir=str(out / "tensorboard"),
                    purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                warnings.warn("train.tensorboard: tensorboard is not installed; not logging",
                              stacklevel=3)
        if t.mlflow:
            try:
                import mlflow
            except ImportError:
                warnings.warn("train.mlflow: mlflow is not installed (pip install mlflow); "
                              "not logging to MLflow", stacklevel=3)
            else:
                try:
                    self._start_mlflow(mlflow, out, cfg, name or out.name)
                except Exception as exc:  # noqa: BLE001 - its stores raise their own types
                    self._mlflow_failed("could not start a run", exc)
        if t.wandb:
            try:
                import wandb
            except ImportError:
                warnings.warn("train.wandb: wandb is not installed (pip install wandb); "
                              "not logging to Weights & Biases", stacklevel=3)
            else:
                try:  # e.g. mode online without 'wandb login': tracking must not stop training
                    self.wandb = wandb.init(project=t.wandb_project, name=name or out.name,
                                            dir=str(out), mode=t.wandb_mode, config=to_dict(cfg))
                except Exception as exc:  # noqa: BLE001 - wandb raises its own error types
                    warnings.warn(f"train.wandb: wandb.init failed ({exc}); not logging to "
                                  "Weights & Biases (train.wandb_mode offline needs no login)",
                                  stacklevel=3)

    def _start_mlflow(self, mlflow: Any, out: Path, cfg: PipelineConfig, name: str) -> None:
        t = cfg.train
        uri = t.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        import logging

        # a new SQLite store logs its table set-up ("Creating initial MLflow database tables",
        # alembic's migrations) at INFO on stderr, between the run's own lines
        for logger in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(t.mlflow_experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            t.mlflow_experiment,
            # the local store's artifacts beside it (MLflow's default is ./mlruns of the cwd)
            artifact_location=None if t.mlflow_uri else (out / "mlruns").resolve().as_uri())
        run_id = client.create_run(exp_id, run_name=name).info.run_id
        self.mlflow = (client, run_id)
        self.local_store = None if t.mlflow_uri else out / "mlflow.db"
        flat = {f"{s}.{k}": v for s, d in to_dict(cfg).items() if s in
                ("augment", "model", "train") for k, v in d.items()}
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, str(v)[:250]) for k, v in flat.items()])

    def _mlflow_failed(self, what: str, exc: BaseException) -> None:
        """Warn once and stop logging to MLflow: tracking must not stop training."""
        self.mlflow = None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(f"train.mlflow: {what} ({type(exc).__name__}: {first}); not logging to "
                      "MLflow for the rest of the run (train.mlflow_uri sets the store)",
                      stacklevel=4)

    def _mlflow_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        client, run_id = self.mlflow
        now = int(time.time() * 1000)
        try:
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        except Exception as exc:  # noqa: BLE001 - a server blip must not end the run
            self._mlflow_failed("logging failed", exc)

    def scalars(self, values: dict[str, float], step: int, step_key: str | None = None) -> None:
        """Log the finite ``values`` (name -> number) at ``step`` to every backend.

        ``step_key``: for series whose steps restart (fine-tuning epochs per fold), W&B gets the
        step as the metric ``step_key`` instead of its own step, which must only increase.
        """
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        if not values:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self._mlflow_metrics(values, step)
        if self.wandb is not None:
            if step_key is None:
                self.wandb.log(values, step=step)
            else:
                self.wandb.log({**values, step_key: step})

    def log(self, rows: list[list[Any]]) -> None:
        """Rows of metrics.csv (METRIC_COLUMNS) of pretraining."""
        for step, _epoch, loss, lr, pps, dt, ct in rows:
            self.scalars({"train/loss": loss, "train/lr": lr, "train/pairs_per_s": pps,
                          "train/data_time_s": dt, "train/compute_time_s": ct}, step)

    def close(self, summary: dict[str, Any] | None = None, out: Path | None = None,
              stopped_by: BaseException | None = None) -> None:
        """Flush and end every backend; ``summary`` None marks the run failed (MLflow, W&B), or
        killed (MLflow's KILLED) when ``stopped_by`` is Ctrl-C or SIGTERM; W&B gets the exit
        code (130, 143; 1 for an error), any non-zero one marking its run failed."""
        interrupted = isinstance(stopped_by, (KeyboardInterrupt, SystemExit))
        code = getattr(stopped_by, "code", None)  # SystemExit's: the CLI's Terminated is 143
        exit_code = (130 if isinstance(stopped_by, KeyboardInterrupt) else
                     code if isinstance(code, int) and code else 1)
        tb, wb = self.tb, self.wandb
        self.tb = self.wandb = None  # a second close does nothing
        numbers = {k: float(v) for k, v in (summary or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if tb is not None:
            tb.flush()
            tb.close()
        if self.mlflow is not None:
            if summary is not None and numbers:
                self._mlflow_metrics(numbers, 0)
            if self.mlflow is not None:
                client, run_id = self.mlflow
                self.mlflow = None
                try:
                    if summary is not None:
                        for name in ("loss.png", "summary.json", "config.yaml"):
                            if out is not None and (out / name).is_file():
                                client.log_artifact(run_id, str(out / name))
                    client.set_terminated(run_id, "FINISHED" if summary is not None else
                                          "KILLED" if interrupted else "FAILED")
                    if self.local_store is not None and self.moves_to is not None:
                        _move_mlflow_artifacts(self.local_store, self.moves_to)
                except Exception as exc:  # noqa: BLE001 - the run itself is finished and saved
                    self._mlflow_failed("ending the run failed", exc)
        if wb is not None:
            if summary is not None:
                wb.summary.update(numbers)
            wb.finish(exit_code=0 if summary is not None else exit_code)


def _move_mlflow_artifacts(db: Path, moves_to: Path) -> None:
    """Point a local MLflow store's artifact locations (``file:`` URIs under the folder that
    holds ``db``) at the folder's name after its rename to ``moves_to``. MLflow keeps absolute
    artifact URIs and has no call to change them, so the SQLite rows (its tracking schema's
    ``experiments.artifact_location`` and ``runs.artifact_uri``) are rewritten."""
    import sqlite3

    folder = db.resolve().parent
    old = folder.as_uri() + "/"
    new = (folder.parent / moves_to.name).as_uri() + "/"
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?", (new, len(old) + 1, len(old), old))


def _on_step_end(step: int) -> None:
    """Hook called after every optimiser step (tests use it to simulate an interruption)."""


class _DeferSignals:
    """Ctrl-C (SIGINT) and SIGTERM wait while :meth:`hold` is on and strike at :meth:`release`.

    A Python signal handler runs between bytecodes, so an interrupt during a step's backward
    pass would surface half-way through the update (batch-norm statistics moved, parameters not
    yet), a state no checkpoint may describe; deferred to the end of the step, the interrupted
    run can save the step it finished. A second signal while one waits acts at once (a stuck
    step must stay stoppable; nothing is saved then). Only handlers set in Python are wrapped
    (``default_int_handler``, the CLI's SIGTERM handler); only in the main thread.

    ``agree`` (DDP): a signal never acts in the handler, whether a step runs or not: one rank
    leaving would leave the others waiting in a collective. It is only recorded
    (:attr:`requested`); the ranks share that flag at each step's end and all stop after the
    same step (:meth:`fire`). A repeat within :attr:`REPEAT_S` is the same request (a scheduler
    signals every process and torchrun forwards the signal again); a later one acts at once,
    and torchrun's SIGKILL after its shutdown timeout ends a job stuck in a collective.
    """

    REPEAT_S = 5.0

    def __init__(self, enabled: bool, agree: bool = False) -> None:
        self.held = False
        self.agree = agree
        self.pending: tuple[Any, int, Any] | None = None
        self.since = 0.0
        self.previous: dict[int, Any] = {}
        if not enabled or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if callable(prev):  # SIG_DFL / SIG_IGN / None (set outside Python) are left alone
                self.previous[sig] = prev
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        stopping_on_a_signal()  # a signal to the process group ends the loader workers now
        prev = self.previous[signum]
        if self.agree and (self.pending is None or time.monotonic() - self.since < self.REPEAT_S):
            if self.pending is None:
                self.pending, self.since = (prev, signum, frame), time.monotonic()
            return
        if not self.held or self.pending is not None:
            self.pending = None
            prev(signum, frame)
        else:
            self.pending = (prev, signum, frame)

    @property
    def requested(self) -> bool:
        """A signal waits (in ``agree`` mode: until the ranks agree to stop)."""
        return self.pending is not None

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        if self.pending is not None and not self.agree:
            self.fire()

    def fire(self) -> None:
        """Act on the waiting signal (its handler raises); with none, raise KeyboardInterrupt:
        another rank was signalled."""
        if self.pending is None:
            raise KeyboardInterrupt
        prev, signum, frame = self.pending
        self.pending = None
        prev(signum, frame)

    def restore(self) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous = {}


def _store_patch_size(stores) -> int | None:
    """The training stores' patch side, or None when they differ."""
    sizes = {int(s.patch_size) for s in stores}
    return sizes.pop() if len(sizes) == 1 else None


def _store_mpp(stores) -> float | None:
    mpps = {round(float(s.mpp), 6) for s in stores if s.mpp is not None}
    return mpps.pop() if len(mpps) == 1 else None


def _store_record(stores) -> list[dict[str, Any]]:
    """The training stores as a checkpoint records them: the batch plan indexes stores by
    position, so resuming on other stores (or the same in another order) would mix two runs."""
    return [{"path": str(Path(s.path).resolve()), "slide_id": str(s.slide_id), "patches": len(s)}
            for s in stores]


def _check_resume_stores(path: Path, saved: list[dict[str, Any]] | None,
                         now: list[dict[str, Any]]) -> None:
    """Refuse to resume ``path`` on stores other than those it was trained on (one line naming
    the first difference). A store that moved (same slide id and patch count at the same place
    in the list, its old path gone) is a warning. A checkpoint from before stores were recorded
    is not checked."""
    if saved is None:
        warnings.warn(f"{path}: written by an older simclr-path that did not record its stores; "
                      "resuming without checking that they are the same", stacklevel=3)
        return

    def name(r: dict[str, Any]) -> str:
        return f"{r['path']} (slide {r['slide_id']}, {r['patches']} patches)"

    def key(r: dict[str, Any]) -> tuple[str, int]:
        return str(r["slide_id"]), int(r["patches"])

    what = None
    if [key(r) for r in saved] != [key(r) for r in now]:
        if sorted(map(key, saved)) == sorted(map(key, now)):
            what = "the same stores in another order, which changes every batch"
        elif len(saved) != len(now):
            gone = [name(r) for r in saved if key(r) not in set(map(key, now))]
            new = [name(r) for r in now if key(r) not in set(map(key, saved))]
            what = (f"{len(saved)} stores, now {len(now)}"
                    + (f"; not given: {gone[0]}" + (f" and {len(gone) - 1} more" if len(gone) > 1 else "")
                       if gone else "")
                    + (f"; new: {new[0]}" + (f" and {len(new) - 1} more" if len(new) > 1 else "")
                       if new else ""))
        else:
            i = next(i for i, (a, b) in enumerate(zip(saved, now)) if key(a) != key(b))
            what = f"store {i + 1} was {name(saved[i])}, now {name(now[i])}"
    else:  # same slide ids and sizes: another path is a moved store, unless the old one is there
        i = next((i for i, (a, b) in enumerate(zip(saved, now)) if a["path"] != b["path"]
                  and Path(a["path"]).exists()), None)
        if i is not None:
            what = f"store {i + 1} was {saved[i]['path']}, now {now[i]['path']}"
    if what:
        raise SimclrPathError(f"{path}: was trained on other patch stores ({what}); resume with "
                              "the stores it was trained on, in the same order, or use --force "
                              "to start over")
    moved = [(a, b) for a, b in zip(saved, now) if a["path"] != b["path"]]
    if moved:
        warnings.warn(f"{path}: store {moved[0][0]['path']} is now {moved[0][1]['path']}"
                      + (f" (and {len(moved) - 1} more)" if len(moved) > 1 else "")
                      + " with the same slide id and patch count; resuming as the same store",
                      stacklevel=3)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def check_view_sizes(sizes: list[tuple[str, int, str]], arch: str, stride: int | None) -> None:
    """Refuse training views smaller than the backbone's output stride.

    ``sizes``: (config key, view side in px, how to change it). Such a view reaches the last
    stage as a 2 x 2 or 1 x 1 map, mostly padding for its strided 3 x 3 convolution. The 1 x 1
    case (views of at most half the stride) also trips a oneDNN bug: in CPU bf16 autocast that
    convolution's backward returns NaN gradients in some calls (PyTorch 2.14, oneDNN 3.12;
    benchmarks/README.md, study 5)."""
    for key, size, how in sizes if stride else []:
        if size < stride:
            raise SimclrPathError(
                f"{key} is {size} px, smaller than {arch}'s output stride ({stride} px), too small "
                f"for its last stage; {how} to at least {stride}")


def pretrain(stores: list[str | os.PathLike], out: str | os.PathLike, cfg: PipelineConfig | None = None,
             resume: bool | str = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pretrain a SimCLR encoder on patch stores; write the run directory ``out``.

    Args:
        stores: patch stores (``tile`` or ``import-patches`` output).
        out: run directory (see the module docstring for its contents).
        cfg: resolved configuration; its ``augment``, ``model`` and ``train`` sections are used.
        resume: continue from ``out/checkpoint.pt`` when there is one (else start fresh).
            ``"interrupted"``: only when that checkpoint is of an unfinished run with this
            configuration and these stores, else start fresh (with ``force``); what a workflow
            rerun after a killed job wants, where the same command must also start new runs.
        force: start over in a non-empty ``out`` (only this run's files are removed).
        progress: show a progress bar (rank 0 only).

    Returns:
        The summary also written to ``summary.json``: steps, epochs, wall_time_s, pairs_per_s,
        final_loss, ... .

    Under ``torchrun`` every process calls this with the same arguments.
    """
    caller = caller_state()
    try:
        from simclr_path.data import BatchPlan, open_stores
        from simclr_path.model import create_simclr_model, output_stride

        cfg = whole_cfg(cfg, "pretrain")
        t_cfg, a_cfg, m_cfg = cfg.train, cfg.augment, cfg.model
        if isinstance(stores, (str, os.PathLike)):  # one path, not its characters
            stores = [stores]
        # opened PatchStore objects are taken too (open_stores keeps them)
        check_apart({"out": out}, {"stores": [getattr(s, "path", s) for s in stores]})
        out = Path(out)
        _check_run_dir(out, bool(resume), force)  # again below, once resume="interrupted" is decided
        world = Dist()
        # ---- every check a user can fail comes before the run directory is touched ----
        device = resolve_device(t_cfg.device, world.local_rank)
        opened = open_stores(stores, image_size=a_cfg.image_size)
        mpps = sorted({float(s.mpp) for s in opened if s.mpp is not None})
        # _store_mpp decides whether encoder.json records an mpp: warn exactly when it records none
        if mpps and _store_mpp(opened) is None and world.main:  # fine for a scale-mixing study
            warnings.warn(
                f"the training stores are at {len(mpps)} resolutions ({', '.join(f'{m:g}' for m in mpps)} "
                "um/px): the encoder records no mpp, so 'embed' cannot match new slides to the tissue "
                "scale it learned; tile every slide at one --mpp unless mixing scales is the point",
                stacklevel=2)
        sides = sorted({int(s.patch_size) for s in opened})
        if len(sides) > 1 and world.main:  # as for the mpp: the encoder then records no side
            warnings.warn(
                f"the training stores have {len(sides)} patch sizes ({', '.join(map(str, sides))} "
                "px): crops of the same scale take other shares of the tissue in each, and the "
                "encoder records no patch size, so 'embed' cannot scale its input to new stores; "
                "tile every slide at one --patch-size unless mixing them is the point",
                stacklevel=2)
        unknown = next((s for s in opened if len(s) and s.mpp is None), None)
        recorded = _store_mpp(opened)
        if unknown is not None and recorded is not None and world.main:
            # (imported tiles carry no mpp), as fine-tuning warns: their scale cannot be checked
            warnings.warn(f"{unknown.path}: no mpp recorded (imported tiles?) while other stores "
                          f"are at {recorded:g} um/px, which the encoder records; make sure the "
                          "tiles are at that scale", stacklevel=2)
        plan = BatchPlan([len(s) for s in opened], t_cfg.batch_size, t_cfg.seed, t_cfg.max_patches_per_slide,
                         world.rank, world.world_size, names=[str(s.path) for s in opened])
        requested = _requested(cfg)
        ck = None
        if resume == "interrupted":
            ck = _interrupted_checkpoint(out / "checkpoint.pt", requested, _store_record(opened),
                                         world.world_size, force, world.main)
            resume = ck is not None
        elif resume not in (True, False):
            raise ValueError(f"resume must be True, False or 'interrupted', got {resume!r}")
        torch.manual_seed(t_cfg.seed)
        np.random.seed(t_cfg.seed % 2**32)
        random.seed(t_cfg.seed)
        model = create_simclr_model(m_cfg)  # unknown arch, bad weights file
        seed_rank(t_cfg.seed, world.rank, 0)  # after the (identical) initialisation
        views = [("augment.image_size", a_cfg.image_size, "set augment.image_size (--image-size)")]
        if a_cfg.local_crops:
            default = " (by default half of augment.image_size, at least 32)" if a_cfg.local_size is None else ""
            views.append((f"augment.local_size{default}", a_cfg.local_view_size,
                          "set augment.local_size in the config"))
        check_view_sizes(views, m_cfg.arch, output_stride(model.backbone))
        fit: dict[str, Any] | None = None
        # with --resume --force given, --force is not the way to start over: leaving out --resume is
        restart = ("leave out --resume to start over (--force is given)" if force else
                   "use --force to start over")
        if resume and (out / "checkpoint.pt").is_file():
            ck = ck or load_checkpoint(out / "checkpoint.pt")
            _check_resume_stores(out / "checkpoint.pt", ck.get("stores"), _store_record(opened))
            old = json.loads(ck["config"])
            if ck.get("budget_fit") and ck.get("augment_requested") == to_dict(cfg)["augment"]:
                # the run trained views fitted to its budget: keep them (the machine may differ now)
                cfg = dataclasses.replace(cfg, augment=AugmentConfig(**old["augment"]))
                a_cfg = cfg.augment
                fit = ck["budget_fit"]
            elif ck.get("budget_fit") and old.get("augment") == to_dict(cfg)["augment"]:
                fit = ck["budget_fit"]  # resumed with the run's own config.yaml: keep the record
            fitted_to = float(fit.get("budget_s", 0.0)) if fit else 0.0
            if fitted_to and t_cfg.time_budget_s and world.main and fitted_to != float(t_cfg.time_budget_s):
                # views cannot change mid-run, so a new budget only moves the stop and the LR schedule
                warnings.warn(f"{out / 'checkpoint.pt'}: its views ({fit.get('trained')}) were fitted "
                              f"to a {_seconds(fitted_to)} s budget; resume keeps them with the "
                              f"{_seconds(float(t_cfg.time_budget_s))} s budget (use --force to start over "
                              "and fit them again)", stacklevel=2)
            if old.get("model") != to_dict(cfg)["model"]:
                raise SimclrPathError(f"{out / 'checkpoint.pt'}: was trained with other "
                                      f"{_differences('model', old.get('model', {}), to_dict(cfg)['model'])}"
                                      f"; resume with the run's own settings (--config "
                                      f"{out / 'config.yaml'}) or {restart}")
            # keys a checkpoint from an older version lacks had their defaults then (e.g. no local crops)
            was_aug = {**defaults_dict()["augment"], **old.get("augment", {})}
            if was_aug != to_dict(cfg)["augment"]:
                raise SimclrPathError(f"{out / 'checkpoint.pt'}: was trained with other "
                                      f"{_differences('augment', was_aug, to_dict(cfg)['augment'])}; "
                                      f"resume with the run's own settings (--config "
                                      f"{out / 'config.yaml'}) or {restart}")
            if a_cfg.local_crops:
                was = ck.get("local_view_size")
                if was is None:  # not recorded before: local_size null meant half of image_size (>= 8)
                    o = old.get("augment", {})
                    was = o.get("local_size") or max(8, int(o.get("image_size", a_cfg.image_size)) // 2)
                if int(was) != a_cfg.local_view_size:
                    raise SimclrPathError(
                        f"{out / 'checkpoint.pt'}: was trained with local views of {was} px, this "
                        f"configuration makes them {a_cfg.local_view_size} px; set augment.local_size: "
                        f"{was} in the config or {restart}")
            # restored from the checkpoint (optimiser and schedule state) or changing the objective
            # mid-run: a new value would be ignored or silently mix two runs
            was, now = old.get("train", {}), to_dict(cfg)["train"]
            changed = [k for k in RESUME_FIXED_TRAIN_KEYS if k in was and was[k] != now[k]]
            if changed:
                raise SimclrPathError(
                    f"{out / 'checkpoint.pt'}: was trained with other "
                    + ", ".join(f"train.{k} ({was[k]!r}, now {now[k]!r})" for k in changed)
                    + f"; resume with the run's own settings (--config {out / 'config.yaml'}) or {restart}")
            if int(ck.get("world_size", 1)) * int(old["train"]["batch_size"]) != \
                    world.world_size * t_cfg.batch_size:
                raise SimclrPathError(f"{out / 'checkpoint.pt'}: global batch size differs from the "
                                      "checkpoint's; resume with the same batch size and process count")
            try:
                model.load_state_dict(ck["model"])
            except RuntimeError as exc:
                raise SimclrPathError(f"{out / 'checkpoint.pt'}: model weights do not fit "
                                      f"({str(exc).splitlines()[0][:160]}); use --force to start over") from None
        elif resume:
            _resume_without_checkpoint(out, force, world.main)
        _check_run_dir(out, resume, force)
        total = _total_steps(t_cfg, plan)
        if ck is not None and ck.get("finished") and int(ck["step"]) >= total and \
                _run_complete(out):
            # nothing left to train: rerunning would only rewrite the finished run's files (its
            # summary with a throughput of 0 pairs/s); said and returned once, by rank 0
            if not world.main:
                return {}
            warnings.warn(f"{out}: the run already finished its {ck['step']} steps; nothing to "
                          "train (raise train.max_steps or train.epochs to go on, or --force to "
                          "start over)", stacklevel=2)
            return json.loads((out / "summary.json").read_text())
        world.init(device)
        if device.type == "cuda":
            # fixed input sizes: cuDNN may pick the fastest convolution once; TF32 for what stays
            # in float32 outside autocast
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        try:
            if world.main:
                _prepare_run_dir(out, resume, force)
            world.barrier()
            if ck is None and t_cfg.time_budget_s and t_cfg.budget_min_steps:
                cfg, fit = _fit_budget(cfg, model, plan, world, device, out, progress)
            return _train(opened, out, cfg, progress, world, device, plan, model, ck, fit, requested)
        finally:
            world.close()
    finally:
        restore_caller_state(caller)


def _total_steps(t_cfg, plan) -> int:
    """The run's length in steps: ``train.max_steps``, else ``train.epochs`` of the batch plan."""
    return int(t_cfg.max_steps) if t_cfg.max_steps else int(t_cfg.epochs) * plan.batches_per_epoch


def _fit_budget(cfg: PipelineConfig, model: nn.Module, plan, world: Dist, device: torch.device,
                out: Path, progress: bool) -> tuple[PipelineConfig, dict[str, Any]]:
    """``cfg`` with the views :func:`simclr_path.budget.fit_views_to_budget` picks (rank 0's
    choice on every process), and the record of that choice."""
    from simclr_path.budget import describe, fit_views_to_budget, view_ladder
    from simclr_path.model import output_stride

    t_cfg = cfg.train
    stride = output_stride(model.backbone)
    total = _total_steps(t_cfg, plan)
    memory_format = torch.channels_last if t_cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)  # as _train will train it
    a, fit = fit_views_to_budget(model, cfg.augment, t_cfg.batch_size, float(t_cfg.time_budget_s),
                                 int(t_cfg.budget_min_steps), total, stride, device,
                                 amp_mode(t_cfg, device), memory_format,
                                 progress=progress and world.main)
    if world.enabled:  # every process trains rank 0's choice and stops at rank 0's budget
        dev = device if device.type == "cuda" else "cpu"
        got = torch.tensor([fit["chosen"]], dtype=torch.float64, device=dev)
        dist.broadcast(got, src=0)
        spent = torch.tensor([fit["trial_s"]], dtype=torch.float64, device=dev)
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)  # the slowest process's trial time
        fit["chosen"], fit["trial_s"] = int(got.item()), float(spent.item())
        a = view_ladder(cfg.augment, stride)[fit["chosen"]]
        fit["trained"] = describe(a)
    # the trial itself used up the budget (a slow or busy machine): say so, or the few steps
    # trained would be a mystery
    spent = fit.get("cut_short") or fit["trial_s"] >= float(t_cfg.time_budget_s)
    if (fit["chosen"] or spent) and world.main:
        first, last = fit["rungs"][0], fit["rungs"][fit["chosen"]]
        msg = f"{out}: "
        if spent:
            msg += (f"timing the views took {_seconds(fit['trial_s'])} s of the "
                    f"{_seconds(t_cfg.time_budget_s)} s budget"
                    + (f" ({fit['cut_short']}, so cheaper views were not timed)"
                       if fit.get("cut_short") else "") + "; ")
        if fit["chosen"]:
            msg += (f"the {_seconds(t_cfg.time_budget_s)} s budget buys about {first['predicted_steps']} "
                    f"steps of {fit['requested']} on this machine, fewer than "
                    f"train.budget_min_steps ({t_cfg.budget_min_steps}); training {fit['trained']} "
                    f"instead (about {last['predicted_steps']} steps; train.budget_min_steps: null "
                    "keeps the configured views)")
        else:
            msg += (f"training {fit['trained']} with what is left (about {last['predicted_steps']} "
                    "steps; train.budget_min_steps: null skips the timing)")
        warnings.warn(msg, stacklevel=3)
    fit["augment_requested"] = to_dict(cfg)["augment"]
    return dataclasses.replace(cfg, augment=a), fit


def _train(opened, out: Path, cfg: PipelineConfig, progress: bool, world: Dist, device: torch.device,
           plan, model: nn.Module, ck: dict[str, Any] | None,
           fit: dict[str, Any] | None = None, requested: str | None = None) -> dict[str, Any]:
    """The loop. ``fit``: the record of :func:`_fit_budget` (its trial passes count against the
    time budget), or None."""
    from simclr_path.data import make_loader
    from simclr_path.loss import NTXentLoss
    from simclr_path.model import (
        global_batchnorm,
        save_encoder,
        save_projection_head,
        sync_batchnorm,
    )
    from simclr_path.transforms import ColorAugment

    t_cfg, a_cfg, m_cfg = cfg.train, cfg.augment, cfg.model
    spe = plan.batches_per_epoch
    total_steps = _total_steps(t_cfg, plan)
    # warm-up is capped at half the run so that short runs (max_steps, demos) still decay
    warmup_wanted = round(t_cfg.warmup_epochs * spe)
    warmup_steps = min(warmup_wanted, total_steps // 2)
    lr = scaled_lr(t_cfg, t_cfg.batch_size * world.world_size)
    cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
    if world.main:
        _write_text(out / "config.yaml",
                    RUN_CONFIG_HEADER + yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ---- model, optimiser, schedule ----
    if world.enabled and t_cfg.sync_batchnorm and device.type == "cuda":
        model = sync_batchnorm(model)  # BN statistics over the global batch
    elif world.enabled and t_cfg.sync_batchnorm:  # nn.SyncBatchNorm is CUDA-only
        model, others = global_batchnorm(model)
        if others and world.main:
            warnings.warn(f"train.sync_batchnorm: {others} batch-norm layer(s) of {cfg.model.arch} "
                          "are of a kind this CPU run cannot synchronise; they normalise over "
                          "each process's batch alone", stacklevel=2)
    model = model.to(device)
    memory_format = torch.channels_last if t_cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, t_cfg, lr)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps)
    dtype = amp_mode(t_cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # float16 steps the scaler skipped (gradients overflowed), whole run; counted on the device
    # so that float16 steps do not wait for the GPU (read when saved)
    fp16_skipped = torch.zeros((), dtype=torch.int64, device=device)
    start_step = 0
    wall_before = 0.0
    saved_plan = None
    if ck is not None:
        try:
            optimizer.load_state_dict(ck["optimizer"])
            if int(ck.get("total_steps", total_steps)) == total_steps:
                scheduler.load_state_dict(ck["scheduler"])
                # the saved schedule's length (replan_scheduler's t_initial = total - warm + 1)
                saved_plan = scheduler.t_initial + scheduler.warmup_t - 1
                # a time budget re-planned the saved schedule to end early; this invocation runs
                # to total_steps (or re-plans to its own budget), so the schedule must too, or
                # every step past the old plan's end would train at LR 0 (a no-op otherwise)
                replan_scheduler(scheduler, total_steps, warmup_wanted)
            elif world.main:  # e.g. a larger --max-steps: warm-up + cosine over the new length
                warnings.warn(f"{out / 'checkpoint.pt'}: run length changed from "
                              f"{ck.get('total_steps')} to {total_steps} steps; the LR schedule is "
                              "re-planned for the new length"
                              + (" and the time budget" if t_cfg.time_budget_s is not None else ""),
                              stacklevel=2)
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise SimclrPathError(f"{out / 'checkpoint.pt'}: optimiser state does not fit this "
                                  f"configuration ({exc}); use --force to start over") from None
        _set_rng_state(ck["rng"])
        start_step = int(ck["step"])
        ranks_rng = ck.get("rng_ranks") or []
        if world.rank and len(ranks_rng) == world.world_size:
            _set_rng_state(ranks_rng[world.rank])  # this rank's own draws continue
        else:  # a checkpoint of another world size (or from before rng_ranks): a fresh stream
            seed_rank(t_cfg.seed, world.rank, start_step)
        wall_before = float(ck.get("wall_time_s", 0.0))
        fp16_skipped.fill_(int(ck.get("fp16_skipped_steps", 0)))
    ema = None
    if t_cfg.ema_decay:
        from timm.utils import ModelEmaV3

        # of the plain module (its parameters are those DDP and torch.compile train); every
        # process keeps one, rank 0's is saved
        ema = ModelEmaV3(model, decay=t_cfg.ema_decay)
        if ck is not None:
            if not ck.get("ema"):
                raise SimclrPathError(f"{out / 'checkpoint.pt'}: has no weight average (it was "
                                      "trained without train.ema_decay); resume with the run's own "
                                      f"settings (--config {out / 'config.yaml'}) or use --force")
            try:
                ema.module.load_state_dict(ck["ema"])
            except RuntimeError as exc:
                raise SimclrPathError(f"{out / 'checkpoint.pt'}: weight average does not fit "
                                      f"({str(exc).splitlines()[0][:160]}); use --force to start "
                                      "over") from None
    train_model: nn.Module = model
    if world.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t_cfg.compile:
        train_model = torch.compile(train_model)
    criterion = NTXentLoss(t_cfg.temperature, gather_distributed=True, decoupled=t_cfg.loss == "dcl",
                           drop_nearest=t_cfg.drop_nearest, hard_beta=t_cfg.hard_beta)
    colour = ColorAugment(a_cfg)
    colour_local = ColorAugment(a_cfg)  # its own scratch buffers: local views have another size
    metrics = (_Metrics(out / "metrics.csv", start_step if ck is not None else None,
                        (ck or {}).get("metrics_csv")) if world.main else None)
    stores_record = _store_record(opened)
    saved_step = start_step  # the step of the newest checkpoint (or of none: start_step 0)

    def resume_hint() -> str:
        return (f"the last good checkpoint is {out / 'checkpoint.pt'} (step {saved_step}; resume "
                "after changing the config is not supported)" if saved_step > 0 else
                "no checkpoint was written before it (every train.checkpoint_every steps), so "
                "start again with --force")

    from simclr_path.embed import file_sha256

    # the initial weights' content (a resume with other weights at the same path starts over)
    weights_sha = (ck.get("weights_sha256") if ck is not None else
                   file_sha256(cfg.model.weights) if cfg.model.weights else None)

    def checkpoint(step: int, wall: float, finished: bool = False) -> None:
        nonlocal saved_step
        # the weights first, on every rank (DDP's are the same): an update comes after the loss
        # logged for its step, so weights it made NaN (a huge LR) passed every loss check and
        # were saved as "the last good checkpoint", or as a completed run's encoder; one sync
        params = [p.detach() for p in _unwrap(train_model).parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise SimclrPathError(
                f"{out}: the weights became NaN or infinite by step {step} (the losses logged "
                f"were finite: an update comes after its loss); {_diverged_fix(t_cfg)}; "
                f"{resume_hint()}{'; no encoder was written' if finished else ''}")
        rng = _rng_state()
        ranks_rng: list[Any] = []
        if world.enabled:  # every rank's generators, so that a resume continues each one's draws
            ranks_rng = [None] * world.world_size
            dist.all_gather_object(ranks_rng, rng, group=sync_group)  # CPU (gloo): no device sync
        if not world.main:
            return
        save_checkpoint(out / "checkpoint.pt", {
            "format_version": CHECKPOINT_VERSION, "simclr_path_version": __version__,
            "step": step, "epoch": step // spe, "batch_in_epoch": step % spe,
            "total_steps": total_steps, "world_size": world.world_size,
            "model": {k: v.detach().cpu() for k, v in _unwrap(train_model).state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()} if ema else {},
            "rng": rng, "rng_ranks": ranks_rng, "config": cfg_json, "wall_time_s": wall,
            "fp16_skipped_steps": int(fp16_skipped),
            # resolved: local_size null depends on the defaults of the version that ran
            "local_view_size": a_cfg.local_view_size if a_cfg.local_crops else 0,
            # views fitted to the time budget: what was asked for, so that resume keeps them
            "budget_fit": fit or {}, "augment_requested": (fit or {}).get("augment_requested"),
            "stores": stores_record,  # resume refuses other stores (the batch plan indexes them)
            # resume="interrupted" continues only an unfinished run of the same request
            "requested": requested, "finished": finished, "weights_sha256": weights_sha,
            # the loss history so far: a workflow deletes a failed job's metrics.csv
            "metrics_csv": (out / "metrics.csv").read_text(),
        })
        saved_step = step  # only once it is on disk: a failed save keeps the older one

    # ---- loop ----
    from tqdm.auto import tqdm

    loader = make_loader(opened, a_cfg, plan, start_step, total_steps, t_cfg.workers,
                         pin_memory=device.type == "cuda")
    # The LR schedule's length. Under train.time_budget_s it is re-planned at every step from the
    # measured step rate so that warm-up + cosine decay end when the budget does (never beyond
    # total_steps); the rate is a running mean, so re-plans move the end by a step or so at most.
    planned = total_steps
    lr_planned = total_steps  # the schedule's length, which a resume may set apart from planned
    budget_ref: tuple[int, float] | None = None
    # DDP: the ranks share rank 0's clock (the time budget) and whether any was signalled at
    # every step's end, over a CPU (gloo) group: a CUDA tensor would sync the device every step
    sync_group = None
    if world.enabled and dist.get_backend() != "gloo":
        sync_group = dist.new_group(backend="gloo")
    budget_s = None if t_cfg.time_budget_s is None else max(
        1e-3, t_cfg.time_budget_s - (float(fit["trial_s"]) if fit and ck is None else 0.0))
    if budget_s is not None and start_step > 0:
        # A resumed budgeted run, until this invocation's step rate is measured: the LR of the
        # saved schedule where it has steps left, else of one at the earlier invocations' mean
        # rate (a plan over total_steps put the LR back into that length's long warm-up for the
        # first steps, then jumped to the budget's plan). The run itself goes on at least until
        # the rate is measured, and the budget re-plans it.
        estimate = total_steps if wall_before <= 0 else int(min(total_steps, max(
            start_step + 1, start_step + budget_s * start_step / wall_before)))
        measured = start_step + BUDGET_SKIP_STEPS + BUDGET_MIN_STEPS
        planned = min(total_steps, max(estimate, measured))
        lr_plan = saved_plan if saved_plan is not None and saved_plan > start_step else estimate
        replan_scheduler(scheduler, lr_plan, warmup_wanted)
        lr_planned = lr_plan
    bar_total = planned
    # rank 0 only: other ranks keep their own trial rows, which rank 0's choice may not index
    if world.main and fit and ck is None and fit["rungs"][fit["chosen"]].get("predicted_steps"):
        # until the step rate is measured and the run re-planned, the fit's estimate: max_steps
        # would show the ETA of a run the budget cannot buy
        bar_total = min(total_steps, max(1, int(fit["rungs"][fit["chosen"]]["predicted_steps"])))
    bar = tqdm(total=bar_total, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=None if progress and world.main else True)
    t0 = time.perf_counter()
    step = start_step
    stopped = "completed"
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on device, lr)
    win_t0, win_data = time.perf_counter(), 0.0
    pairs_per_s = float("nan")
    # no terminal (a workflow's log file, a batch job): tqdm shows nothing, so a line a minute
    lines = progress and world.main and bool(bar.disable)
    last_line = -math.inf
    train_model.train()
    non_blocking = device.type == "cuda"
    x_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None
    xl_buf: torch.Tensor | None = None
    # created just before the try so that every exit below ends it (FAILED unless finished)
    tracker = _Tracker(out, cfg, enabled=world.main,
                       resume_step=start_step if ck is not None else None)

    def flush(check: bool = True) -> bool:
        """Write the pending rows; False when a loss is not finite (an error if ``check``)."""
        nonlocal win_t0, win_data, pairs_per_s, last_line
        if not pending:
            return True
        losses = torch.stack([p[1] for p in pending]).float()
        if world.enabled:
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            losses /= world.world_size
        losses = losses.cpu().tolist()  # the one device sync per window
        now = time.perf_counter()
        n = len(pending)
        span = max(now - win_t0, 1e-9)
        pairs_per_s = n * t_cfg.batch_size * world.world_size / span
        data_t = win_data / n
        comp_t = max(span - win_data, 0.0) / n
        rows = [[s, (s - 1) // spe, v, lr_s, round(pairs_per_s, 3), round(data_t, 5),
                 round(comp_t, 5)] for (s, _, lr_s), v in zip(pending, losses)]
        bad = [r for r in rows if not math.isfinite(r[2])]
        pending.clear()
        win_t0, win_data = now, 0.0
        if world.main:
            metrics.append(rows)
            tracker.log(rows)
            bar.set_postfix(loss=f"{rows[-1][2]:.4f}", lr=f"{rows[-1][3]:.3g}", pairs_s=f"{pairs_per_s:.1f}")
            if lines and now - last_line >= LOG_LINE_S:
                last_line = now
                print(f"pretrain: step {rows[-1][0]}/{bar.total} loss {rows[-1][2]:.4f} lr "
                      f"{rows[-1][3]:.3g} {pairs_per_s:.1f} pairs/s, {now - t0:.0f} s",
                      file=sys.stderr, flush=True)
        if bad and check:
            raise SimclrPathError(
                f"{out}: loss became {bad[0][2]} at step {bad[0][0]}; {_diverged_fix(t_cfg)}; "
                f"{resume_hint()}")
        return not bad

    guard = _DeferSignals(enabled=True, agree=world.enabled)
    consistent = True  # model, optimiser, schedule, RNGs and pending rows are those of `step`
    it = None
    try:
        it = iter(loader)
        while step < planned:
            td = time.perf_counter()
            try:
                v1, v2, *local = next(it)  # local: [(K B, 3, l, l) uint8] with multi-crop
            except StopIteration:
                break
            except RuntimeError as exc:  # a worker killed by SIGBUS: /dev/shm is full
                if guard.requested:
                    # the signal that waits (DDP's agreement) ended the workers too, before the
                    # batch this rank waited for: stop on it now (the last periodic checkpoint
                    # stays), not with the loader's error
                    guard.fire()
                if "shared memory" not in str(exc):
                    raise
                raise SimclrPathError(
                    f"{out}: a data loader worker ran out of shared memory (/dev/shm); give the "
                    "container more (docker run --shm-size=2g), or lower train.workers or "
                    "train.batch_size") from None
            win_data += time.perf_counter() - td
            n = v1.shape[0]
            if v_buf is None or v_buf.shape != (2 * n, *v1.shape[1:]):
                v_buf = torch.empty((2 * n, *v1.shape[1:]), dtype=v1.dtype, device=device)
            # both views straight from the loader's (pinned, on CUDA) tensors into one reused
            # buffer: torch.cat on the host would make a new, unpinned tensor every step
            views = v_buf  # (2B, 3, s, s) uint8
            views[:n].copy_(v1, non_blocking=non_blocking)
            views[n:].copy_(v2, non_blocking=non_blocking)
            gen = torch.Generator().manual_seed(_aug_seed(t_cfg.seed, step, world.rank))
            if x_buf is None or x_buf.shape[0] != views.shape[0]:
                # one input buffer for the whole run, in the model's memory format; the previous
                # step's graph (which saved it) is gone by the time it is overwritten
                x_buf = torch.empty(views.shape, device=device).contiguous(memory_format=memory_format)
            x = colour(views, gen, out=x_buf)  # (2B, 3, s, s) float32
            if local:
                lv = local[0].to(device, non_blocking=non_blocking)
                if xl_buf is None or xl_buf.shape != lv.shape:
                    xl_buf = torch.empty(lv.shape, device=device).contiguous(memory_format=memory_format)
                local = [colour_local(lv, gen, out=xl_buf)]  # (K B, 3, l, l) float32
            guard.hold()  # from here to the step's checkpoint, an interrupt waits for the end
            consistent = False
            scheduler.step_update(step + 1)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                _, z = train_model(x, *local)  # (2B + K B, D)
            z = z.float()
            loss = criterion(z[:n], z[n:2 * n], z[2 * n:] if local else None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # float16 (GPUs without bf16): a step whose gradients overflowed updated nothing
            # and the scaler backed off its scale tensor in place; compared on the device
            # (get_scale() would wait for the GPU twice a step)
            scale = scaler._get_scale_async().clone() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            step += 1
            skipped_now = None
            if scale is not None:
                skipped_now = scaler._get_scale_async() < scale  # () bool, on the device
                fp16_skipped += skipped_now
            # the weight average leaves such steps out: the one float16 case that waits
            if ema is not None and not (skipped_now is not None and bool(skipped_now)):
                ema.update(model, step)  # step 1 copies the weights, later steps average (decay)
            pending.append((step, loss.detach(), optimizer.param_groups[0]["lr"]))
            consistent = True
            if world.main:
                bar.update(1)
            stop_now = signalled = False
            elapsed = time.perf_counter() - t0
            if world.enabled:  # every process stops at the same step: rank 0's clock, any signal
                shared = torch.tensor([elapsed if world.main else 0.0, float(guard.requested)],
                                      dtype=torch.float64)
                dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=sync_group)
                elapsed, signalled = float(shared[0]), bool(shared[1])
            if signalled:  # all ranks are here: save this step, then stop every one of them
                why = ""
                if flush(check=False) and step > saved_step:
                    try:  # rank 0 writes; a failure (disk full) must still reach the barrier
                        checkpoint(step, wall_before + time.perf_counter() - t0)
                    except Exception as exc:  # noqa: BLE001 - the interrupt still stops the run
                        why = f", could not save it ({type(exc).__name__}: {exc})"
                if world.main:
                    warnings.warn(f"{out / 'checkpoint.pt'}: interrupted after step {step}{why}; "
                                  f"--resume continues from step {saved_step}", stacklevel=2)
                dist.barrier(group=sync_group)  # no rank leaves (torchrun would end rank 0) mid-save
                world.stopped_together = True
                guard.fire()
            if t_cfg.time_budget_s is not None:
                stop_now = elapsed >= budget_s
                if step - start_step == BUDGET_SKIP_STEPS:
                    budget_ref = (step, elapsed)
                new = (budget_steps(step, elapsed, budget_ref, budget_s, total_steps)
                       if budget_ref is not None and not stop_now else None)
                if new is not None and (new != planned or new != lr_planned):
                    planned = lr_planned = new
                    replan_scheduler(scheduler, planned, warmup_wanted)
                    if world.main:
                        bar.total = planned
                        bar.refresh()
            if len(pending) >= t_cfg.log_every or step >= planned or stop_now:
                flush()
            if step % t_cfg.checkpoint_every == 0 and step < planned and not stop_now:
                flush()
                checkpoint(step, wall_before + time.perf_counter() - t0)
            guard.release()  # raises a deferred interrupt: below, with a consistent state
            raise_pending_signal()  # one Python discarded (raised in h5py's weakref callback)
            _on_step_end(step)
            if stop_now and step < total_steps:
                stopped = "time_budget"
                break
        if stopped == "completed" and planned <= step < total_steps:
            stopped = "time_budget"  # the re-planned schedule ended just before the budget
        flush()
    except BaseException as exc:
        # Ctrl-C or SIGTERM (the CLI's Terminated): keep the steps done, so that --resume goes
        # on from here rather than from the last periodic checkpoint (train.checkpoint_every
        # apart, more steps than a CPU budget buys). Only from a finished step's state, and only
        # for a single process: DDP saved the step its ranks agreed on above, and an interrupt
        # that arrives here under DDP (a second signal) may have left a rank gone, so a
        # collective would hang. A signal after the last step under DDP lets the run finish.
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        if interrupted and consistent and not world.enabled and step > start_step:
            try:
                if flush(check=False):
                    if step > saved_step:
                        checkpoint(step, wall_before + time.perf_counter() - t0)
                    warnings.warn(f"{out / 'checkpoint.pt'}: interrupted after step {step}; saved "
                                  "it (--resume continues from there)", stacklevel=2)
            except Exception as err:  # noqa: BLE001 - e.g. disk full: the interrupt still stops the run
                warnings.warn(f"{out / 'checkpoint.pt'}: interrupted after step {step}, could not "
                              f"save it ({type(err).__name__}: {err}); --resume continues from "
                              f"step {saved_step}", stacklevel=2)
        bar.close()
        tracker.close(None, stopped_by=exc)
        if world.enabled and isinstance(exc, RuntimeError) and _peer_lost(exc):
            # the process that failed printed its own line; this one's was gloo's or NCCL's
            # traceback of the broken connection, which read as the cause
            raise SimclrPathError(
                f"{out}: process {world.rank} stopped at step {step + 1} because another process "
                f"of this run did (its own error is above); {resume_hint()}") from None
        raise
    finally:
        guard.restore()
        # the loader's workers end now (the loop stops before the iterator is exhausted), not
        # when the iterator is collected, which may be at interpreter exit
        getattr(it, "_shutdown_workers", lambda: None)()
        worker_reports_back()  # (stopping_on_a_signal, in the guard's handler)
    bar.close()
    try:  # writing the final files can fail too (disk full): the tracker still ends, FAILED
        if step < total_steps and stopped == "completed":
            stopped = "data_exhausted"
        wall = wall_before + time.perf_counter() - t0
        checkpoint(step, wall, finished=True)
        summary: dict[str, Any] = {}
        if world.main:
            from simclr_path.figures import plot_loss_curve

            # the weight average, when kept, is the run's encoder (and head)
            core = ema.module if ema is not None else _unwrap(train_model)
            mpp = _store_mpp(opened)
            if math.isfinite(metrics.last_loss):  # at least one row
                plot_loss_curve(out / "metrics.csv", out / "loss.png", force=True,
                                title=f"SimCLR pretraining loss ({m_cfg.arch}, {out.name})")
            save_projection_head(core.head, out / "head.pt", force=True)
            save_encoder(core.backbone, out / "encoder.pt", m_cfg.arch, force=True,
                         image_size=a_cfg.image_size, crop_scale=list(a_cfg.crop_scale), mpp=mpp,
                         # the training patches' side: embed scales its input size for stores
                         # of another side (embed.fixres_size)
                         patch_size=_store_patch_size(opened),
                         head=core.head.config(),
                         stores=[str(s.path) for s in opened], steps=step,
                         ema_decay=t_cfg.ema_decay,
                         simclr_path_version=__version__)
            trained_steps = step - start_step
            summary = {
                "steps": step, "total_steps": total_steps, "planned_steps": planned,
                "epochs": round(step / spe, 4),
                "steps_per_epoch": spe, "stopped": stopped,
                "wall_time_s": round(wall, 3),
                "pairs_per_s": round(trained_steps * plan.batch_size * world.world_size
                                     / max(time.perf_counter() - t0, 1e-9), 3),
                "final_loss": metrics.last_loss,
                "global_batch_size": plan.batch_size * world.world_size,
                "lr": lr, "ema_decay": t_cfg.ema_decay, "world_size": world.world_size, "device": str(device),
                "amp": str(dtype).replace("torch.", "") if dtype else "float32",
                "arch": m_cfg.arch, "image_size": a_cfg.image_size, "mpp": mpp,
                # resolved here: config.yaml may say local_size null
                "local_crops": a_cfg.local_crops,
                "local_view_size": a_cfg.local_view_size if a_cfg.local_crops else None,
                "budget_fit": {k: v for k, v in fit.items() if k != "augment_requested"} if fit else None,
                "n_stores": len(opened), "patches_per_epoch": plan.patches_per_epoch,
                "resumed_from_step": start_step if ck is not None else None,
                # float16 only: steps of the run whose update the gradient scaler skipped
                "fp16_skipped_steps": int(fp16_skipped) if scaler.is_enabled() else None,
            }
            _write_text(out / "summary.json", json.dumps(summary, indent=2))
            tracker.close(summary, out)
    except BaseException as exc:
        tracker.close(None, stopped_by=exc)
        raise
    if world.enabled:  # on gloo: NCCL's watchdog would end ranks that wait out a slow finish
        dist.barrier(group=sync_group)  # (rank 0's tracker upload, say) as a hang
        world.stopped_together = True
    if world.main:  # last: a kill before this (a tracker's upload) only rewrites the final files
        _record_finished(out, step, wall)
    return summary


# how gloo and NCCL report a collective whose peer process has gone
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "communicator was aborted",
              "remote process exited", "Broken pipe")


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process stopped."""
    return any(m in str(exc) for m in _PEER_LOST)


def _aug_seed(seed: int, step: int, rank: int) -> int:
    from simclr_path.data import _seed

    return _seed(seed, step, rank, 13)
