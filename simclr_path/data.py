"""SimCLR training data over many patch stores (slide stores and imported patch stores).

* :func:`open_stores` validates the inputs (no stores, empty stores, views larger than patches).
* :class:`BatchPlan` decides, for every epoch, which patches are used (optionally at most
  ``max_patches_per_slide`` per store, redrawn each epoch), shuffles them across slides, and splits
  each global batch between processes (like ``DistributedSampler``, dropping the incomplete last
  batch). Everything is a pure function of ``(seed, epoch)``, so a run resumed at step ``k``
  sees exactly the batches an uninterrupted run would.
* :class:`TwoViewBatches` is the map-style dataset the DataLoader workers index with one whole
  batch at a time (a list of ``(store, patch)`` keys and a seed): each worker opens the HDF5 files
  lazily in its own process (:class:`~simclr_path.store.PatchStore`), reads the patches, and
  applies the geometric augmentations (:class:`~simclr_path.transforms.GeometricViews`) on uint8,
  returning two uint8 tensors (three with multi-crop's local views). Colour and stain
  augmentation run later, batched on the device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_path.config import AugmentConfig
from simclr_path.errors import SimclrPathError
from simclr_path.outputs import check_distinct
from simclr_path.store import PatchStore, close_open_files


def open_stores(paths: Sequence[str | os.PathLike | PatchStore], image_size: int | None = None,
                ) -> list[PatchStore]:
    """Open and check the training stores; return those with patches.

    A store without patches (a slide without tissue) is skipped with a warning when others have
    patches; all empty, none given, or views larger than a store's patches raise
    :class:`SimclrPathError`.
    """
    if isinstance(paths, (str, os.PathLike)):  # one path, not its characters
        paths = [paths]
    if not paths:
        raise SimclrPathError("no patch stores given; pass one or more STORE.h5 files "
                              "(from 'simclr-path tile' or 'simclr-path import-patches')")
    stores = [p if isinstance(p, PatchStore) else PatchStore(p) for p in paths]
    check_distinct([s.path for s in stores], "patch store")  # else its patches weigh double
    kept = [s for s in stores if len(s) > 0]
    if not kept:
        names = ", ".join(str(s.path) for s in stores[:3]) + (" ..." if len(stores) > 3 else "")
        raise SimclrPathError(f"{names}: no patches in the given store(s); tile with a lower "
                              "--min-tissue or check the slides")
    for s in stores:
        if len(s) == 0:
            warnings.warn(f"{s.path}: store has no patches; skipped", stacklevel=2)
    if image_size is not None:
        for s in kept:
            if image_size > s.patch_size:
                raise SimclrPathError(
                    f"{s.path}: augment.image_size {image_size} is larger than the stored "
                    f"{s.patch_size} px patches; pass --image-size {s.patch_size} or less (or "
                    "set augment.image_size in the --config YAML), or re-tile with a larger "
                    "--patch-size")
    return kept


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for different parts)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Batch:
    """One process's share of a global batch: ``keys`` (B, 2) = (store index, patch index)."""

    epoch: int
    index: int  # batch index within the epoch
    keys: np.ndarray
    seed: int  # seeds the geometric augmentation of this batch


class BatchPlan:
    """Deterministic batches across stores, sharded between processes.

    Args:
        sizes: number of patches of each store.
        batch_size: per-process batch size B.
        seed: run seed.
        max_patches_per_slide: use at most this many patches of each store per epoch (a fresh
            random subset each epoch); None = all.
        rank, world_size: this process and the number of processes; each global batch of
            ``B * world_size`` patches is split in contiguous slices by rank.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0,
                 max_patches_per_slide: int | None = None, rank: int = 0, world_size: int = 1,
                 names: Sequence[str] | None = None) -> None:
        self.sizes = [int(n) for n in sizes]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.cap = max_patches_per_slide
        self.rank, self.world_size = int(rank), int(world_size)
        if self.cap is not None and self.cap < 1:
            raise SimclrPathError(f"train.max_patches_per_slide must be >= 1, got {self.cap}")
        used = sum(min(n, self.cap) if self.cap else n for n in self.sizes)
        self.patches_per_epoch = used
        global_batch = self.batch_size * self.world_size
        if used < global_batch:
            what = f" ({self.world_size} processes x {self.batch_size})" if self.world_size > 1 else ""
            where = f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: " if names else ""
            raise SimclrPathError(
                f"{where}batch size {global_batch}{what} is larger than the {used} training "
                f"patches{' (after max_patches_per_slide)' if self.cap else ''}; use a smaller "
                "--batch-size or more patches")
        self.batches_per_epoch = used // global_batch

    def epoch_keys(self, epoch: int) -> np.ndarray:
        """All (store, patch) keys of ``epoch`` in training order, before sharding: (M, 2)."""
        rng = np.random.default_rng(_seed(self.seed, epoch, 7))
        parts = []
        for si, n in enumerate(self.sizes):
            idx = (np.sort(rng.choice(n, size=self.cap, replace=False))
                   if self.cap is not None and self.cap < n else np.arange(n))
            parts.append(np.stack([np.full(len(idx), si), idx], axis=1))
        keys = np.concatenate(parts).astype(np.int64)
        return keys[rng.permutation(len(keys))]

    def batches(self, start_step: int = 0, total_steps: int | None = None) -> Iterator[Batch]:
        """This process's batches from global step ``start_step`` on (epochs repeat as needed)."""
        step = int(start_step)
        while total_steps is None or step < total_steps:
            epoch, b = divmod(step, self.batches_per_epoch)
            keys = self.epoch_keys(epoch)
            g = self.batch_size * self.world_size
            while b < self.batches_per_epoch and (total_steps is None or step < total_steps):
                lo = b * g + self.rank * self.batch_size
                yield Batch(epoch, b, keys[lo:lo + self.batch_size],
                            _seed(self.seed, epoch, b, self.rank, 11))
                b += 1
                step += 1


def read_patch(store: PatchStore, i: int) -> np.ndarray:
    """One patch of a store. Patch stores keep one LZF-compressed patch per HDF5 chunk
    (:mod:`simclr_path.store`): reading the raw chunk and decoding it with imagecodecs takes half
    the time of h5py's filter pipeline, and 50x less than h5py fancy indexing of a batch."""
    ds = store._h5.file["patches"]
    s = ds.shape[1:]
    if ds.chunks == (1, *s) and ds.compression == "lzf":
        import imagecodecs

        try:
            mask, raw = ds.id.read_direct_chunk((i, 0, 0, 0))
            data = raw if mask & 1 else imagecodecs.lzf_decode(raw, out=int(np.prod(s)))
            return np.frombuffer(data, dtype=np.uint8).reshape(s)
        except (OSError, ValueError, imagecodecs.LzfError) as exc:  # a damaged chunk
            raise store.damaged(f"patch {i}", exc) from None
    return store[i]


class TwoViewBatches(Dataset):
    """Map-style dataset indexed by :class:`Batch`: two uint8 views of each patch (plus local views).

    ``dataset[batch]`` -> ``(v1, v2)``, each uint8 (B, 3, s, s) with s = ``cfg.image_size``
    (planar, which the batched colour ops read fastest). With ``cfg.local_crops`` = K > 0
    (multi-crop) it returns ``(v1, v2, local)``, ``local`` uint8 (K * B, 3, l, l) with
    l = ``cfg.local_view_size``, crop-major: row ``k * B + i`` is local crop k of patch i.
    Used with ``DataLoader(dataset, batch_size=None, sampler=plan.batches(...))`` so each worker
    reads and augments a whole batch (few, large messages between processes).
    """

    def __init__(self, stores: Sequence[PatchStore], cfg: AugmentConfig) -> None:
        from simclr_path.transforms import GeometricViews

        self.stores = list(stores)
        self.cfg = cfg
        self.geometric = GeometricViews(cfg)
        self.local = GeometricViews(cfg, local=True) if cfg.local_crops else None

    def __len__(self) -> int:  # not used for sampling; the plan drives the loader
        return sum(len(s) for s in self.stores)

    def read(self, keys: np.ndarray) -> list[np.ndarray]:
        """The patches of ``keys`` (B, 2), in order (each (S, S, 3) uint8)."""
        return [read_patch(self.stores[int(si)], int(pi)) for si, pi in keys]

    def __getitem__(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        patches = self.read(batch.keys)
        self.geometric.seed(batch.seed)
        v1 = np.stack([self.geometric(p) for p in patches]).transpose(0, 3, 1, 2)
        v2 = np.stack([self.geometric(p) for p in patches]).transpose(0, 3, 1, 2)
        out = [torch.from_numpy(np.ascontiguousarray(v1)), torch.from_numpy(np.ascontiguousarray(v2))]
        if self.local is not None:
            self.local.seed(_seed(batch.seed, 17))  # its own stream: global views do not change
            loc = np.stack([self.local(p) for _ in range(self.cfg.local_crops) for p in patches])
            out.append(torch.from_numpy(np.ascontiguousarray(loc.transpose(0, 3, 1, 2))))
        return tuple(out)


class _PlanSampler:
    """Iterable over :class:`Batch` items, generated lazily (a long run has many epochs)."""

    def __init__(self, plan: BatchPlan, start_step: int, total_steps: int) -> None:
        self.plan, self.start, self.total = plan, int(start_step), int(total_steps)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[Batch]:
        return self.plan.batches(self.start, self.total)


def cv2_fork_safe() -> None:
    """Stop OpenCV's idle pool threads before DataLoader workers fork. A child inherits the
    pool's condition variables with waiters that do not exist there, and its first
    ``cv2.setNumThreads`` or parallel call waits for them forever: a Python session that tiled
    (cv2 resizes on its pool) and then pretrained with workers hung. The pool restarts at the
    parent's next parallel call, with the same thread count."""
    import cv2

    n = cv2.getNumThreads()
    cv2.setNumThreads(1)
    cv2.setNumThreads(n)


def one_thread_worker(_: int) -> None:
    """``worker_init_fn`` of every DataLoader of the package (pretraining, embedding,
    fine-tuning)."""
    # Workers augment on uint8 with OpenCV: one thread each, so N workers use N cores, not N^2.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_loader(stores: Sequence[PatchStore], cfg: AugmentConfig, plan: BatchPlan, start_step: int,
                total_steps: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """DataLoader of ``(v1, v2[, local])`` uint8 view batches for steps ``start_step .. total_steps - 1``."""
    ds = TwoViewBatches(stores, cfg)
    sampler = _PlanSampler(plan, start_step, total_steps)
    # no more worker processes than batches to make (as embed and fine-tuning): each idle one
    # costs a process start and its memory
    workers = max(0, min(int(workers), total_steps - start_step))
    # two batches ahead per worker (PyTorch's default), not more: each is in shared memory (77 MB
    # at batch 256 of 224 px views), and containers often have little (Docker's default: 64 MB)
    kw = {"prefetch_factor": 2, "persistent_workers": False} if workers > 0 else {}
    if workers > 0:
        cv2_fork_safe()
        # forked workers would inherit the parent's open store files on top of those they
        # open themselves: twice the open-file limit's share on a large cohort
        close_open_files()
    # Its own generator: each iter() of a DataLoader draws its workers' base seed from the
    # generator given, else from the global torch RNG, which a resumed run has just restored, so
    # that draw shifted every dropout / drop-path mask after a resume (the views have their own
    # seeds either way)
    return DataLoader(ds, batch_size=None, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=one_thread_worker if workers else None,
                      generator=torch.Generator().manual_seed(plan.seed), **kw)
