"""NT-Xent: against an independent reference, lightly's NTXentLoss, and across gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from simclr_path.loss import NTXentLoss


def reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float, decoupled: bool = False,
                     drop: int = 0, beta: float = 0.0) -> torch.Tensor:
    """Eq. 1 of Chen et al. 2020, written as plain loops in float64 (no masking tricks); with
    ``decoupled``, eq. 6 of Yeh et al. 2022 (DCL: the positive is not in the denominator); with
    ``drop``, the ``drop`` other images closest to the anchor (by their closer view) are left out
    of its denominator (false-negative elimination, Huynh et al. 2022); with ``beta``, the
    negatives' sum is M times their mean weighted by exp(beta * s) (Robinson et al. 2021)."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        others = [b for b in range(n) if b != i % n]
        closeness = {b: max(torch.dot(z[i], z[b]).item(), torch.dot(z[i], z[b + n]).item()) for b in others}
        dropped = sorted(others, key=lambda b: -closeness[b])[:drop]
        sims = [torch.dot(z[i], z[k]) / t for k in range(n2)
                if k != i and not (decoupled and k == j) and k % n not in dropped]
        denom = torch.logsumexp(torch.stack(sims), dim=0)
        if beta:
            pos = torch.dot(z[i], z[j]) / t
            negs = [s for k, s in zip((k for k in range(n2) if k != i and not (decoupled and k == j)
                                       and k % n not in dropped), sims) if k != j]
            w = torch.stack([torch.exp(beta * s) for s in negs])
            ng = len(negs) * (w * torch.stack([torch.exp(s) for s in negs])).sum() / w.sum()
            denom = torch.log(ng if decoupled else torch.exp(pos) + ng)
        total = total + (denom - torch.dot(z[i], z[j]) / t)
    return total / n2


def _inputs(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_matches_reference_value_and_gradient(t, decoupled):
    a, b = _inputs()
    z1, z2 = a.clone().float().requires_grad_(), b.clone().float().requires_grad_()
    loss = NTXentLoss(t, decoupled=decoupled)(z1, z2)
    loss.backward()
    r1, r2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = reference_ntxent(r1, r2, t, decoupled)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(z1.grad.double(), r1.grad, atol=1e-5)
    assert torch.allclose(z2.grad.double(), r2.grad, atol=1e-5)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("drop", [1, 3])
def test_drop_nearest_matches_reference_value_and_gradient(drop, decoupled):
    a, b = _inputs(n=7, d=4, seed=5)
    z1, z2 = a.clone().float().requires_grad_(), b.clone().float().requires_grad_()
    loss = NTXentLoss(0.2, decoupled=decoupled, drop_nearest=drop)(z1, z2)
    loss.backward()
    r1, r2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = reference_ntxent(r1, r2, 0.2, decoupled, drop=drop)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(z1.grad.double(), r1.grad, atol=1e-5)
    assert torch.allclose(z2.grad.double(), r2.grad, atol=1e-5)
    # it changes the loss: the dropped negatives are the largest terms of the denominator
    assert loss.item() < NTXentLoss(0.2, decoupled=decoupled)(a.float(), b.float()).item() - 1e-3


@pytest.mark.parametrize(("decoupled", "drop"), [(False, 0), (True, 0), (False, 2)])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_hard_negative_weighting_matches_reference(beta, decoupled, drop):
    a, b = _inputs(n=6, d=4, seed=7)
    z1, z2 = a.clone().float().requires_grad_(), b.clone().float().requires_grad_()
    loss = NTXentLoss(0.3, decoupled=decoupled, drop_nearest=drop, hard_beta=beta)(z1, z2)
    loss.backward()
    r1, r2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = reference_ntxent(r1, r2, 0.3, decoupled, drop=drop, beta=beta)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(z1.grad.double(), r1.grad, atol=1e-5)
    assert torch.allclose(z2.grad.double(), r2.grad, atol=1e-5)
    # hard negatives weigh more: the loss rises with beta
    plain = NTXentLoss(0.3, decoupled=decoupled, drop_nearest=drop)(a.float(), b.float())
    assert loss.item() > plain.item() + 1e-3
    assert abs(NTXentLoss(0.3, decoupled=decoupled, drop_nearest=drop, hard_beta=0.0)(
        a.float(), b.float()).item() - plain.item()) < 1e-6
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="hard_beta"):
            NTXentLoss(0.3, hard_beta=bad)
    with pytest.raises(ValueError, match="at least 2 images"):
        NTXentLoss(0.3, decoupled=decoupled, hard_beta=beta)(a[:1].float(), b[:1].float())


def test_drop_nearest_removes_a_duplicate_image_from_the_negatives():
    # images 0 = 1 and 2 = 3 are tiles seen twice: as negatives of each other they are false ones
    a, b = _inputs(n=4, d=6, seed=6)
    a[1], b[1], a[3], b[3] = a[0], b[0], a[2], b[2]
    loss = NTXentLoss(0.5, drop_nearest=1)(a.float(), b.float())
    # each anchor's twin leaves its denominator; the other pair's four views stay
    z = torch.nn.functional.normalize(torch.cat([a[[0, 2]], b[[0, 2]]]), dim=1) / 0.5 ** 0.5
    sim = z @ z.T  # (4, 4): rows/columns a0, a2, b0, b2, divided by t
    ref = torch.stack([torch.log(sim[i, (i + 2) % 4].exp() + 2 * sim[i, [k for k in range(4) if k % 2 != i % 2]].exp().sum())
                       - sim[i, (i + 2) % 4] for i in range(4)]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert loss.item() < NTXentLoss(0.5)(a.float(), b.float()).item() - 0.1
    # at least one negative image stays, whatever k asks
    two = NTXentLoss(0.5, drop_nearest=5)(a[:2].float() + 0.1, b[:2].float())
    assert torch.isfinite(two)
    assert abs(two.item() - NTXentLoss(0.5)(a[:2].float() + 0.1, b[:2].float()).item()) < 1e-6
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="drop_nearest"):
            NTXentLoss(0.5, drop_nearest=bad)


def test_multi_crop_is_the_mean_over_global_and_local_pairs():
    a, b = _inputs(n=5, d=4, seed=1)
    loc = torch.randn(2 * 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z1, z2, zl = (t.clone().float().requires_grad_() for t in (a, b, loc))
    loss = NTXentLoss(0.2)(z1, z2, zl)
    loss.backward()
    r1, r2, rl = (t.clone().requires_grad_() for t in (a, b, loc))
    pairs = [(r1, r2)] + [(g, rl[k * 5:(k + 1) * 5]) for k in range(2) for g in (r1, r2)]
    ref = torch.stack([reference_ntxent(x, y, 0.2) for x, y in pairs]).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for got, want in ((z1, r1), (z2, r2), (zl, rl)):
        assert torch.allclose(got.grad.double(), want.grad, atol=1e-5)
    assert torch.equal(NTXentLoss(0.2)(a.float(), b.float(), None), NTXentLoss(0.2)(a.float(), b.float()))
    with pytest.raises(ValueError, match="local must be"):
        NTXentLoss(0.2)(z1, z2, torch.randn(7, 4))


@pytest.mark.parametrize(
    ("decoupled", "theirs_name", "seed"), [(False, "NTXentLoss", 3), (True, "DCLLoss", 4)]
)
def test_matches_lightly(decoupled, theirs_name, seed):
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = _inputs(n=8, d=16, seed=seed)
    ours = [a.clone().float().requires_grad_(), b.clone().float().requires_grad_()]
    theirs = [a.clone().float().requires_grad_(), b.clone().float().requires_grad_()]
    lo = NTXentLoss(0.2, decoupled=decoupled)(*ours)
    lt = getattr(lightly_loss, theirs_name)(temperature=0.2)(*theirs)
    lo.backward()
    lt.backward()
    assert abs(lo.item() - lt.item()) < 1e-5
    for x, y in zip(ours, theirs):
        assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_decoupled_drops_the_positive_from_the_denominator():
    a, b = _inputs(n=8, d=16, seed=4)
    # the decoupled loss is the coupled one minus the mean log of 1 / (1 - p_pos): always lower
    dcl = NTXentLoss(0.2, decoupled=True)(a.float(), b.float())
    assert dcl.item() < NTXentLoss(0.2)(a.float(), b.float()).item()
    # with identical views of orthogonal vectors the positive term is 1 / t and every negative is 0
    z = torch.eye(4)
    assert math.isclose(NTXentLoss(0.5, decoupled=True)(z, z).item(), math.log(6) - 2.0, rel_tol=1e-5)


def test_perfect_alignment_gives_low_loss_and_bad_shapes_raise():
    z = torch.eye(4) * 10
    assert NTXentLoss(0.1)(z, z).item() < 1e-3
    assert math.isclose(NTXentLoss(0.1)(torch.ones(4, 3), torch.ones(4, 3)).item(), math.log(7), rel_tol=1e-5)
    with pytest.raises(ValueError):
        NTXentLoss(0.1)(torch.ones(4, 3), torch.ones(3, 3))


# ---- two gloo processes with batch N == one process with batch 2N ----
N, D_IN, D_OUT, T = 4, 6, 5, 0.3


def _setup():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2 * N, D_IN, generator=g)
    x2 = torch.randn(2 * N, D_IN, generator=g)
    lin = torch.nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D_OUT, D_IN, generator=g))
        lin.bias.copy_(torch.randn(D_OUT, generator=g))
    return x1, x2, lin


def _local(k: int, sl: slice, lin) -> torch.Tensor | None:
    """K local views of the images in ``sl``, crop-major (K * len, D_OUT); None when K = 0."""
    if not k:
        return None
    xl = torch.randn(k, 2 * N, D_IN, generator=torch.Generator().manual_seed(1))
    return lin(xl[:, sl].reshape(-1, D_IN))


def _worker(rank: int, world: int, init_file: str, out_file: str, k: int = 0, dcl: bool = False,
            drop: int = 0, beta: float = 0.0) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x1, x2, lin = _setup()
        sl = slice(rank * N, (rank + 1) * N)
        z1 = lin(x1[sl]).detach().requires_grad_()
        z2 = lin(x2[sl]).detach().requires_grad_()
        zl = _local(k, sl, lin)
        loss = NTXentLoss(T, decoupled=dcl, drop_nearest=drop, hard_beta=beta)(z1, z2, None if zl is None else zl.detach())
        loss.backward()
        # parameter gradients as DDP computes them: local backward, then mean over processes
        p1, p2 = lin(x1[sl]), lin(x2[sl])
        lin.zero_grad()
        NTXentLoss(T, decoupled=dcl, drop_nearest=drop, hard_beta=beta)(p1, p2, _local(k, sl, lin)).backward()
        grads = torch.cat([lin.weight.grad.flatten(), lin.bias.grad.flatten()])
        dist.all_reduce(grads)
        grads /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        zg = torch.stack([z1.grad, z2.grad])
        all_zg = [torch.empty_like(zg) for _ in range(world)]
        dist.all_gather(all_zg, zg)
        if rank == 0:
            torch.save({"loss": mean_loss, "param_grad": grads, "z_grad": torch.cat(all_zg, dim=1)},
                       out_file)
    finally:
        dist.destroy_process_group()


# k local views per image (multi-crop); dcl: the decoupled loss; drop: false negatives dropped
# (chosen among all processes' images)
# beta: hard-negative weighting
@pytest.mark.parametrize(("k", "dcl", "drop", "beta"), [
    (0, False, 0, 0.0), (2, False, 0, 0.0), (0, True, 0, 0.0), (2, False, 2, 0.0), (2, False, 2, 1.0)])
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path, k, dcl, drop, beta):
    out = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), k, dcl, drop, beta), nprocs=2,
             join=True)
    got = torch.load(out, weights_only=True)

    x1, x2, lin = _setup()
    z1 = lin(x1).detach().requires_grad_()
    z2 = lin(x2).detach().requires_grad_()
    zl = _local(k, slice(0, 2 * N), lin)
    loss = NTXentLoss(T, decoupled=dcl, drop_nearest=drop, hard_beta=beta)(z1, z2, None if zl is None else zl.detach())
    loss.backward()
    lin.zero_grad()
    NTXentLoss(T, decoupled=dcl, drop_nearest=drop, hard_beta=beta)(lin(x1), lin(x2), _local(k, slice(0, 2 * N), lin)).backward()
    grads = torch.cat([lin.weight.grad.flatten(), lin.bias.grad.flatten()])

    assert abs(got["loss"].item() - loss.item()) < 1e-5
    assert torch.allclose(got["param_grad"], grads, atol=1e-5)
    # each process's loss is a mean over its own anchors: its gradient w.r.t. the projections
    # (summed over processes by the gather's backward) is W times the global one
    assert torch.allclose(got["z_grad"] / 2, torch.stack([z1.grad, z2.grad]), atol=1e-5)
