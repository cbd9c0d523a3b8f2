"""NT-Xent, the SimCLR contrastive loss, with negatives gathered from every process.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations", eq. 1:
for 2N projections of N pairs, the loss of anchor i with positive j(i) is

    l_i = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

with cosine similarity ``sim`` and temperature ``t``, averaged over all 2N anchors.

Under DDP each process holds N local pairs; the negatives of its anchors are the projections of
*all* processes (2 N W candidates). The gather must be differentiable in the right way: the loss of
process r depends on the projections of process q, so the gradient w.r.t. q's projections is the
**sum** over all processes of their losses' gradients. :class:`GatherLayer` all-reduces the
gradient in its backward pass and returns the local slice. The bug this avoids, found in several
public SimCLR implementations: gathering with ``torch.distributed.all_gather`` (no gradient at
all: the other processes' projections act as constants, and each process only learns from its own
loss' gradient w.r.t. its own projections), or a custom backward that returns
``grad_output[rank]`` without the all-reduce; either way the gradient misses the contributions of
the other processes' losses, so multi-GPU training silently optimises a different objective than
single-GPU training with the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class GatherLayer(torch.autograd.Function):
    """All-gather with a correct backward: (N, D) per process -> (W * N, D) in rank order.

    Backward: the incoming gradient of the full gathered tensor is summed over all processes
    (``all_reduce``), and each process keeps the slice of its own rows. Works with any backend
    that supports all_gather and all_reduce (nccl, gloo).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, D) from every process, concatenated in rank order (W * N, D); identity when not
    distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GatherLayer.apply(x)
    return x


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (NT-Xent) for two views.

    Args:
        temperature: softmax temperature t (SimCLR uses 0.1-0.5).
        gather_distributed: under ``torch.distributed``, use the projections of all processes as
            negatives (the effective batch is the global batch).

    ``loss(z1, z2)``: z1, z2 (N, D) projections of the two views of the same N images (row i of
    z1 and row i of z2 are a positive pair). Returns the mean over this process's 2N anchors; with
    DDP's gradient averaging this yields exactly the gradient of the global-batch loss.

    ``loss(z1, z2, local)`` with multi-crop (Caron et al. 2020, "Unsupervised Learning of Visual
    Features by Contrasting Cluster Assignments", section 3.2): ``local`` (K N, D) holds K small
    views of the same N images, crop-major (row k N + i is crop k of image i). The loss is the
    mean of the two-view loss over the 1 + 2K pairs (z1, z2), (z1, local_k), (z2, local_k): each
    local view is contrasted with the global views only, as in SwAV and DINO, since two small
    crops of one patch need not show the same tissue.

    ``decoupled=True`` is the decoupled contrastive loss (DCL; Yeh et al. 2022, "Decoupled
    Contrastive Learning", eq. 6): the positive is left out of the denominator,

        l_i = -sim(z_i, z_j) / t + log sum_{k != i, j} exp(sim(z_i, z_k) / t),

    which removes the negative-positive coupling that shrinks NT-Xent's gradient when a small
    batch holds few hard negatives (their section 3). The loss can be negative.

    ``drop_nearest=k`` is false-negative elimination (Huynh et al. 2022, "Boosting Contrastive
    Self-Supervised Learning with False Negative Cancellation", section 3.2): for each anchor the
    k other images whose closer view is most similar to it (both of their views) leave the
    denominator. Tiles of one tissue region, or near-duplicate tiles, would otherwise be pushed
    apart as negatives. The choice is made on detached similarities; at least one negative image
    is always kept.

    ``hard_beta=b > 0`` weights the negatives by their similarity (Robinson et al. 2021,
    "Contrastive Learning with Hard Negative Samples", eq. 3 with tau+ = 0): the sum over the
    M' negatives becomes M' times their mean under q(k) proportional to exp(b sim(z_i, z_k) / t),

        log sum_k exp(s_k) -> log M' + logsumexp_k((1 + b) s_k) - logsumexp_k(b s_k),

    with s_k = sim(z_i, z_k) / t, so hard negatives weigh more; b = 0 is NT-Xent (or DCL).
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True,
                 decoupled: bool = False, drop_nearest: int = 0, hard_beta: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(drop_nearest, bool) or int(drop_nearest) != drop_nearest or drop_nearest < 0:
            raise ValueError(f"drop_nearest must be an integer >= 0, got {drop_nearest!r}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        self.decoupled = bool(decoupled)
        self.drop_nearest = int(drop_nearest)
        if not 0 <= hard_beta < float("inf"):  # NaN and inf too (inf - inf in the weights)
            raise ValueError(f"hard_beta must be a finite number >= 0, got {hard_beta!r}")
        self.hard_beta = float(hard_beta)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
        n = z1.shape[0]
        if local is not None and (local.ndim != 2 or local.shape[1] != z1.shape[1]
                                  or local.shape[0] % n or not len(local)):
            raise ValueError(f"local must be (K N, D) with N = {n}, D = {z1.shape[1]}, K >= 1, "
                             f"got {tuple(local.shape)}")
        views = [z1, z2, *(local.split(n) if local is not None else ())]
        views = [F.normalize(v.float(), dim=1) for v in views]  # (N, D) each: local anchors
        offset = 0
        cands = views
        if self.gather_distributed and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            cands = [gather_with_grad(v) for v in views]  # (W N, D) each, gathered once
            offset = dist.get_rank() * n
        if (self.decoupled or self.hard_beta) and cands[0].shape[0] < 2:
            # NT-Xent still has the other view in its denominator; these have no term left
            raise ValueError("the decoupled loss and hard-negative weighting need at least 2 "
                             "images (one negative), got 1")
        pairs = [(0, 1)] + [(g, 2 + k) for k in range(len(views) - 2) for g in (0, 1)]
        return torch.stack([self._pair(views[a], views[b], cands[a], cands[b], offset)
                            for a, b in pairs]).mean()

    def _pair(self, z1: torch.Tensor, z2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
              offset: int) -> torch.Tensor:
        """Eq. 1 for one pair of views: normalised local anchors z1, z2 (N, D), candidates c1, c2
        (M, D) (all processes' rows; c = z in one process), this process's rows from ``offset``."""
        n = z1.shape[0]
        anchors = torch.cat([z1, z2])  # (2N, D)
        cands = torch.cat([c1, c2])  # (2M, D)
        m = c1.shape[0]  # candidates per view
        logits = anchors @ cands.T / self.temperature  # (2N, 2M)
        rows = torch.arange(2 * n, device=z1.device)
        local = torch.arange(n, device=z1.device) + offset
        self_idx = torch.cat([local, local + m])  # each anchor's own column
        pos_idx = torch.cat([local + m, local])  # its other view
        # an anchor is not its own negative
        logits = logits.index_put((rows, self_idx), logits.new_full((2 * n,), float("-inf")))
        k = min(self.drop_nearest, m - 2)  # m - 1 other images; keep one as a negative
        if k > 0:
            logits = logits.masked_fill(self._nearest(logits.detach(), rows, pos_idx, m, k), float("-inf"))
        if not self.decoupled and not self.hard_beta:
            return F.cross_entropy(logits, pos_idx)
        pos = logits[rows, pos_idx]  # (2N,)
        negs = logits.index_put((rows, pos_idx), logits.new_full((2 * n,), float("-inf")))
        if self.hard_beta:  # log of the reweighted negative sum (-inf columns weigh nothing)
            b = self.hard_beta
            count = torch.isfinite(negs).sum(dim=1).to(negs.dtype)
            neg = count.log() + torch.logsumexp((1 + b) * negs, dim=1) - torch.logsumexp(b * negs, dim=1)
        else:
            neg = torch.logsumexp(negs, dim=1)
        if self.decoupled:
            return (neg - pos).mean()
        return (torch.logaddexp(pos, neg) - pos).mean()

    @staticmethod
    def _nearest(logits: torch.Tensor, rows: torch.Tensor, pos_idx: torch.Tensor, m: int,
                 k: int) -> torch.Tensor:
        """(2N, 2M) bool: both columns of each anchor's k most similar other images. ``logits``
        (2N, 2M) has -inf in the anchor's own column; its positive's column is set to -inf here,
        so the anchor's own image is never chosen."""
        s = logits.index_put((rows, pos_idx), logits.new_full((len(rows),), float("-inf")))
        per_image = torch.maximum(s[:, :m], s[:, m:])  # (2N, M): the closer of the two views
        idx = per_image.topk(k, dim=1).indices  # (2N, k)
        mask = torch.zeros_like(s, dtype=torch.bool)
        return mask.scatter_(1, idx, True).scatter_(1, idx + m, True)
