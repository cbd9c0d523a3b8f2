"""Training data: batches across stores, per-slide caps, determinism, sharding, lazy HDF5 in workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simclr_path.config import AugmentConfig
from simclr_path.data import BatchPlan, TwoViewBatches, make_loader, open_stores
from simclr_path.errors import SimclrPathError
from simclr_path.store import PatchStore


def test_plan_covers_every_store_and_is_deterministic():
    plan = BatchPlan([10, 6, 4], batch_size=4, seed=1)
    assert plan.batches_per_epoch == 5
    keys = plan.epoch_keys(0)
    assert sorted(map(tuple, keys)) == [(s, i) for s, n in enumerate([10, 6, 4]) for i in range(n)]
    assert np.array_equal(keys, BatchPlan([10, 6, 4], 4, seed=1).epoch_keys(0))
    assert not np.array_equal(keys, plan.epoch_keys(1))  # reshuffled every epoch
    assert not np.array_equal(keys, BatchPlan([10, 6, 4], 4, seed=2).epoch_keys(0))
    # shuffled across slides: the first batch mixes stores
    assert len({int(s) for s in keys[:8, 0]}) > 1


def test_cap_per_slide():
    plan = BatchPlan([100, 3, 50], batch_size=2, seed=0, max_patches_per_slide=5)
    assert plan.patches_per_epoch == 5 + 3 + 5
    for epoch in range(2):
        counts = np.bincount(plan.epoch_keys(epoch)[:, 0], minlength=3)
        assert counts.tolist() == [5, 3, 5]
    a, b = plan.epoch_keys(0), plan.epoch_keys(1)
    assert {tuple(k) for k in a if k[0] == 0} != {tuple(k) for k in b if k[0] == 0}  # new subset


def test_resume_position_and_sharding():
    plan = BatchPlan([13, 9], batch_size=3, seed=4)
    full = list(plan.batches(0, 12))
    later = list(plan.batches(5, 12))
    assert [b.keys.tolist() for b in full[5:]] == [b.keys.tolist() for b in later]
    assert [b.seed for b in full[5:]] == [b.seed for b in later]
    assert full[plan.batches_per_epoch].epoch == 1
    # two processes split each global batch of 6 without overlap
    r0 = list(BatchPlan([13, 9], 3, seed=4, rank=0, world_size=2).batches(0, 3))
    r1 = list(BatchPlan([13, 9], 3, seed=4, rank=1, world_size=2).batches(0, 3))
    for a, b in zip(r0, r1):
        assert not {tuple(k) for k in a.keys} & {tuple(k) for k in b.keys}


def test_batch_larger_than_data_and_bad_stores(make_store, tmp_path):
    with pytest.raises(SimclrPathError, match="batch size 8 is larger than the 6 training patches"):
        BatchPlan([4, 2], batch_size=8)
    with pytest.raises(SimclrPathError, match="2 processes x 4"):
        BatchPlan([6], batch_size=4, world_size=2)
    with pytest.raises(SimclrPathError, match="no patch stores given"):
        open_stores([])
    empty = make_store(n=0, size=16, name="empty.h5")
    with pytest.raises(SimclrPathError, match="no patches"):
        open_stores([empty])
    full = make_store(n=4, size=16, name="full.h5")
    assert [len(s) for s in open_stores(str(full))] == [4]  # one path, not its characters
    with pytest.warns(UserWarning, match="no patches; skipped"):
        assert len(open_stores([empty, full])) == 1
    link = tmp_path / "again.h5"
    link.symlink_to(full)
    with pytest.raises(SimclrPathError, match=rf"again.h5: given twice \(also as {full}\); "
                                              "pass each patch store once"):
        open_stores([full, link])  # its patches would weigh double
    with pytest.raises(SimclrPathError, match="larger than the stored 16 px") as exc:
        open_stores([full], image_size=24)
    # the hint fits both commands that open stores (pretrain and preview): no pretrain-only name
    assert "--image-size 16 or less" in str(exc.value) and "--config" in str(exc.value)
    assert "pretrain" not in str(exc.value)
    with pytest.raises(SimclrPathError, match="not found"):
        open_stores([tmp_path / "missing.h5"])


def test_two_views_per_batch_are_deterministic_and_uint8(make_store):
    s1 = make_store(n=8, size=16, name="a.h5")
    s2 = make_store(n=8, size=16, name="b.h5", seed=1)
    stores = open_stores([s1, s2])
    ds = TwoViewBatches(stores, AugmentConfig(image_size=12))
    batch = next(BatchPlan([8, 8], 4, seed=0).batches(0, 1))
    v1, v2 = ds[batch]
    assert v1.shape == v2.shape == (4, 3, 12, 12) and v1.dtype == torch.uint8  # planar
    w1, w2 = TwoViewBatches(stores, AugmentConfig(image_size=12))[batch]
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    # the patches read are the ones the keys name (no augmentation: full crop, no flips)
    plain = AugmentConfig(image_size=16, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip=0, vflip=0,
                          rot90=0)
    p1, _ = TwoViewBatches(stores, plain)[batch]
    for row, (si, pi) in zip(p1.numpy(), batch.keys):
        assert np.array_equal(row.transpose(1, 2, 0), stores[si][int(pi)])


def test_local_crops_add_small_views_and_leave_the_global_views_unchanged(make_store):
    stores = open_stores([make_store(n=8, size=16, name="a.h5")])
    batch = next(BatchPlan([8], 4, seed=3).batches(0, 1))
    cfg = AugmentConfig(image_size=12, local_crops=3, local_size=8)
    v1, v2, loc = TwoViewBatches(stores, cfg)[batch]
    assert loc.shape == (3 * 4, 3, 8, 8) and loc.dtype == torch.uint8
    w1, w2 = TwoViewBatches(stores, AugmentConfig(image_size=12))[batch]
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # the local views use their own stream
    _, _, again = TwoViewBatches(stores, cfg)[batch]
    assert torch.equal(loc, again)
    # crop-major: row k * B + i is a crop of patch i; full-area "local" crops of a plain config
    # are the patch itself, resized
    plain = AugmentConfig(image_size=16, local_crops=2, local_size=16, local_crop_scale=[1.0, 1.0],
                          crop_ratio=[1.0, 1.0], hflip=0, vflip=0, rot90=0)
    _, _, loc = TwoViewBatches(stores, plain)[batch]
    for k in range(2):
        for i, (si, pi) in enumerate(batch.keys):
            assert np.array_equal(loc[k * 4 + i].numpy().transpose(1, 2, 0), stores[si][int(pi)])


def test_loader_workers_open_their_own_files_and_match_in_process(make_store):
    s1 = make_store(n=12, size=16, name="a.h5")
    s2 = make_store(n=12, size=16, name="b.h5", seed=2)
    stores = [PatchStore(s1), PatchStore(s2)]
    cfg = AugmentConfig(image_size=16)
    plan = BatchPlan([12, 12], 4, seed=3)
    seq = [tuple(t.clone() for t in b) for b in make_loader(stores, cfg, plan, 0, 6, workers=0)]
    par = [tuple(t.clone() for t in b) for b in make_loader(stores, cfg, plan, 0, 6, workers=2)]
    assert len(seq) == len(par) == 6
    # never more worker processes than batches to make (--workers 1000 started 1000)
    assert make_loader(stores, cfg, plan, 4, 6, workers=1000).num_workers == 2
    for a, b in zip(seq, par):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the parent's handles are untouched by the workers' (lazily opened) ones
    import os

    assert stores[0]._h5._pid == os.getpid()
    assert stores[0][0].shape == (16, 16, 3)
    state = stores[0]._h5.__getstate__()
    assert state["_f"] is None  # what workers receive under spawn: no open handle


class _Probe(TwoViewBatches):
    """Reports which process read the batch and which process opened the HDF5 handle."""

    def __getitem__(self, batch):
        import os

        super().__getitem__(batch)
        return torch.tensor([os.getpid(), self.stores[0]._h5._pid, self.stores[1]._h5._pid])


def test_each_worker_opens_the_hdf5_files_lazily_itself(make_store):
    import os

    from torch.utils.data import DataLoader

    stores = open_stores([make_store(n=8, size=16, name="a.h5"), make_store(n=8, size=16, name="b.h5")])
    plan = BatchPlan([8, 8], 8, seed=0)
    ds = _Probe(stores, AugmentConfig(image_size=16))
    rows = list(DataLoader(ds, batch_size=None, sampler=list(plan.batches(0, 4)), num_workers=2))
    pids = {int(r[0]) for r in rows}
    assert os.getpid() not in pids
    for r in rows:
        assert int(r[1]) == int(r[0]) and int(r[2]) == int(r[0])  # handles opened in the worker


def test_direct_chunk_reads_equal_h5py_reads(tmp_path, make_store):
    from simclr_path.data import read_patch
    from simclr_path.store import PatchStoreWriter

    smooth = np.tile(np.arange(16, dtype=np.uint8)[None, :, None, None], (5, 1, 16, 3))  # LZF shrinks
    with PatchStoreWriter(tmp_path / "smooth.h5", 16) as w:
        w.append(smooth, np.zeros((5, 2)))
    noisy = make_store(n=5, size=16, name="noisy.h5")  # LZF cannot shrink: stored raw
    for path in (tmp_path / "smooth.h5", noisy):
        s = PatchStore(path)
        for i in range(5):
            assert np.array_equal(read_patch(s, i), s[i])


def test_loader_workers_start_after_opencv_ran_on_its_thread_pool(make_store, tmp_path):
    """A session that tiled (cv2 resizes on OpenCV's pool) and then pretrained with workers hung:
    the forked worker waited forever on the pool's inherited condition variables."""
    import subprocess
    import sys

    store = make_store(n=8, size=32, name="s.h5")
    script = f"""
import cv2, numpy as np
from simclr_path.config import load_config
from simclr_path.data import BatchPlan, make_loader, open_stores
cv2.setNumThreads(2)
img = np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)
for _ in range(3):
    cv2.resize(img, (700, 700), interpolation=cv2.INTER_AREA)
stores = open_stores([{str(store)!r}], image_size=16)
aug = load_config(overrides={{"augment": {{"image_size": 16}}}}).augment
loader = make_loader(stores, aug, BatchPlan([8], 4), 0, 2, workers=1)
print("batches", sum(1 for _ in loader))
cv2.resize(img, (700, 700), interpolation=cv2.INTER_AREA)  # the parent's pool works again
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "batches 2" in done.stdout, done.stderr[-2000:]
