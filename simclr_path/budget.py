"""Fitting the training views to a wall-clock budget (``train.budget_min_steps``).

A time-budgeted recipe (``train.time_budget_s``, the ``cpu-fast`` preset) is tuned on one
machine, but the same budget buys 3-7 times fewer steps on a 2-core CPU without native bf16
than on one with it (benchmarks/README.md, study 6): there the ``cpu-fast`` views (128 px plus
four 64 px local crops) got 55-95 steps in 600 s, and with 55 ended below a random-init encoder. So before
training, :func:`fit_views_to_budget` times one forward + backward pass at each rung of
:func:`view_ladder` (the configured views first, then cheaper ones) and trains the first rung
for which the budget buys at least ``train.budget_min_steps`` steps (or the cheapest rung).

The choice depends on the machine's speed, so it is recorded: ``config.yaml`` and
``encoder.json`` hold the views actually trained, ``summary.json`` and the checkpoint hold
the whole decision (``budget_fit``), and ``--resume`` keeps the checkpoint's views.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from simclr_path.config import AugmentConfig
from simclr_path.transforms import ColorAugment


def _round8(x: float) -> int:
    return max(8, round(x / 8.0) * 8)


def view_ladder(a: AugmentConfig, stride: int | None) -> list[AugmentConfig]:
    """The configured views, then cheaper ones, most expensive first.

    Rungs: the configured views; with multi-crop, the same full-size views without local crops;
    then two views of 3/4 and of 1/2 the side (multiples of 8). No rung has a view below the
    backbone's output ``stride`` (``train.check_view_sizes``) and no two rungs are equal.
    """
    floor = int(stride or 8)
    rungs = [a]
    if a.local_crops:
        rungs.append(dataclasses.replace(a, local_crops=0, local_size=None))
    for f in (0.75, 0.5):
        size = _round8(a.image_size * f)
        if size >= floor:
            rungs.append(dataclasses.replace(a, image_size=size, local_crops=0, local_size=None))

    def key(r: AugmentConfig) -> AugmentConfig:  # local_size means nothing without local crops
        return r if r.local_crops else dataclasses.replace(r, local_size=None)

    out: list[AugmentConfig] = []
    for r in rungs:
        if all(key(r) != key(o) for o in out):
            out.append(r)
    return out


def describe(a: AugmentConfig) -> str:
    """``"128 px views + 4 x 64 px local views"`` / ``"96 px views"``."""
    s = f"{a.image_size} px views"
    if a.local_crops:
        s += f" + {a.local_crops} x {a.local_view_size} px local views"
    return s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_pass(model: nn.Module, a: AugmentConfig, device: torch.device,
                    dtype: torch.dtype | None, memory_format: torch.memory_format,
                    pairs: int) -> float:
    """Seconds per pair of one training step's compute at ``a``'s view sizes.

    Timed: the batched colour and stain augmentation of the uint8 views (``ColorAugment``, as
    the loop runs it) and the forward + backward pass, on random inputs of ``pairs`` pairs (two
    full-size views each plus ``a.local_crops`` local views), after one untimed step
    (allocations, kernel selection). Left out: the loader's crops (another process) and the
    optimiser step. Time it at the training batch size: on CPUs a small batch runs faster per
    pair (its activations stay in cache), and predicted from 8 pairs the 600 s budget bought 96
    steps of ``cpu-fast`` views where 64-pair training got 55 (study 6). The model's parameters,
    buffers (batch norm statistics) and mode are as before afterwards, its gradients are None,
    and nothing draws from the global RNGs (a backbone with dropout or drop-path still does)."""
    state = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()
    g = torch.Generator().manual_seed(0)

    def batch(n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g).to(device)
        return views, torch.empty(views.shape, device=device).contiguous(memory_format=memory_format)

    groups = [batch(2 * pairs, a.image_size)]
    if a.local_crops:
        groups.append(batch(a.local_crops * pairs, a.local_view_size))
    colour = [ColorAugment(a) for _ in groups]  # own scratch buffers per view size, as in the loop
    try:
        seconds = 0.0
        for i in range(2):
            _sync(device)
            t0 = time.perf_counter()
            x = [c(v, g, out=buf) for c, (v, buf) in zip(colour, groups)]
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                _, z = model(*x)
            z.float().square().mean().backward()
            _sync(device)
            if i:
                seconds = time.perf_counter() - t0
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        model.train(was_training)
    return seconds / pairs


def fit_views_to_budget(model: nn.Module, a: AugmentConfig, batch_size: int, budget_s: float,
                        min_steps: int, max_steps: int, stride: int | None, device: torch.device,
                        dtype: torch.dtype | None, memory_format: torch.memory_format,
                        progress: bool = False) -> tuple[AugmentConfig, dict[str, Any]]:
    """The views to train within ``budget_s`` seconds, and the record of the decision.

    Walks :func:`view_ladder` from the configured views down, timing each rung
    (:func:`time_train_pass`, scaled to ``batch_size`` pairs per step), and stops at the first
    whose predicted step count reaches ``min(min_steps, max_steps)`` (a run capped at fewer steps
    needs no more); when none does, the cheapest rung. The trial passes count against the budget
    (seconds to tens of seconds on a slow CPU: ``progress`` shows a bar over the rungs), so the
    walk also stops once the budget is spent or the next rung's trial would not fit in what is
    left (estimated as long as the last rung's, which was dearer), and the cheapest rung timed so
    far is trained: on a slow or busy machine timing every rung took several times the budget.

    Returns ``(augment section to train, record)``; the record has ``min_steps``, ``budget_s``,
    ``trial_s`` (seconds spent timing), ``chosen`` (rung index), ``cut_short`` (None, or why
    cheaper rungs were left untimed) and ``rungs``: per rung timed, ``image_size``,
    ``local_crops``, ``local_view_size`` and ``predicted_steps`` (None, with ``error``, for a
    cheaper rung the model cannot run, which is skipped).
    """
    t0 = time.perf_counter()
    need = min(int(min_steps), int(max_steps))
    rungs = view_ladder(a, stride)
    rows: list[dict[str, Any]] = []
    chosen = 0
    cut_short: str | None = None
    last_trial = 0.0  # wall seconds of the last rung's trial
    bar = tqdm(rungs, desc="timing views for the budget", unit="rung", leave=False,
               disable=None if progress else True)
    for i, r in enumerate(bar):
        if i:
            left = budget_s - (time.perf_counter() - t0)
            if left <= 0:
                cut_short = "the budget was spent"
                break
            if last_trial >= left:
                cut_short = "timing the next views would not fit in what is left"
                break
        bar.set_postfix_str(describe(r))
        t_rung = time.perf_counter()
        try:
            per_pair = time_train_pass(model, r, device, dtype, memory_format, batch_size)
        except RuntimeError as exc:  # e.g. a ViT whose patch size does not divide this view side
            if i == 0:
                raise  # the configured views themselves do not run: training would fail too
            rows.append({"image_size": r.image_size, "local_crops": r.local_crops,
                         "local_view_size": r.local_view_size if r.local_crops else None,
                         "predicted_steps": None, "error": str(exc).splitlines()[0][:200]})
            continue
        last_trial = time.perf_counter() - t_rung  # of a rung that ran: a failure is quicker
        chosen = i  # the cheapest rung that runs, unless one before it affords the steps
        left = max(0.0, budget_s - (time.perf_counter() - t0))
        steps = int(left / max(per_pair * batch_size, 1e-9))
        rows.append({"image_size": r.image_size, "local_crops": r.local_crops,
                     "local_view_size": r.local_view_size if r.local_crops else None,
                     "predicted_steps": steps})
        if steps >= need:
            break
    bar.close()
    record = {"min_steps": int(min_steps), "budget_s": float(budget_s),
              "trial_s": round(time.perf_counter() - t0, 3), "chosen": chosen,
              "cut_short": cut_short,
              "requested": describe(a), "trained": describe(rungs[chosen]), "rungs": rows}
    return rungs[chosen], record
