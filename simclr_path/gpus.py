"""Give a workflow job GPUs of its own: ``simclr-path with-gpus N -- COMMAND ...``.

Snakemake's ``gpu`` resource only counts jobs: with ``resources: gpu=4`` on a 4-GPU machine it
starts up to four GPU jobs at once, but each would pick ``cuda:0`` (and a torchrun job GPUs 0 to
k-1). This wrapper claims ``N`` GPUs no other job holds, through an exclusive ``flock`` on one lock
file per GPU in the machine's temporary folder, sets ``CUDA_VISIBLE_DEVICES`` to them and
replaces itself with the command (``exec``): the locks stay with the command's process and are
released by the kernel when it exits, however it ends. When every GPU is taken (another workflow
on the same machine) it waits.

Jobs share a lock folder when they could share GPUs: one per user on the machine, and one per
scheduler job (``SLURM_JOB_ID``, ``PBS_JOBID``, ``LSB_JOBID``), since a job a scheduler
started has only its own GPUs to share, numbered from 0 by ``CUDA_VISIBLE_DEVICES`` like any
other job's (a whole workflow run inside one allocation shares the allocation's GPUs; jobs that
the SLURM executor submits one by one never wait for each other). ``CUDA_VISIBLE_DEVICES``, when
set, is the pool to share. Without GPUs the command runs unchanged. The folder is under ``/tmp``
(not ``$TMPDIR``, which differs between shells of one machine) unless
``SIMCLR_PATH_GPU_LOCKS`` names another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

from simclr_path.errors import SimclrPathError

SCHEDULER_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")  # a scheduler job's GPUs are its own
LOCK_ROOT_VAR = "SIMCLR_PATH_GPU_LOCKS"
# NVIDIA's driver (and its device in containers that lack /proc/driver), AMD's ROCm, WSL2's GPU
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
_held: list[int] = []  # this process's lock descriptors (see :func:`release`)


def gpu_pool() -> list[str]:
    """The GPUs a job may claim: ``CUDA_VISIBLE_DEVICES``' entries, else every GPU of the machine."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # as CUDA reads it: entries up to the first invalid one (empty or negative); "0,-1,1"
        # shows GPU 0 alone, "-1" none
        pool = []
        for v in (v.strip() for v in visible.split(",")):
            if not v or v.lstrip("-").isdigit() and int(v) < 0:
                break
            pool.append(v)
        return pool
    if not any(Path(d).exists() for d in GPU_DRIVER_PATHS):
        return []  # no GPU driver: skip importing torch (seconds) in every job on a CPU machine
    import torch  # only here: a set CUDA_VISIBLE_DEVICES needs no CUDA query

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _safe(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``-`` and ``_`` kept, anything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def lock_dir() -> Path:
    """The lock folder of the jobs that share this job's GPUs: one per user on this machine, and
    one per scheduler job inside it."""
    root = os.environ.get(LOCK_ROOT_VAR) or ("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir())
    name = f"simclr-path-gpus-{os.getuid()}"
    job = next((os.environ[v] for v in SCHEDULER_VARS if os.environ.get(v)), None)
    if job:
        name += "-job-" + _safe(job)
    path = Path(root) / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # the name is predictable in a shared /tmp: a folder (or link) another user made first
    # could hold our GPUs' locks or point our lock files elsewhere
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SimclrPathError(f"{path}: the GPU lock folder is not a folder of yours that only you "
                              f"can write; remove it, or set {LOCK_ROOT_VAR} to a folder of yours")
    return path


def _open_lock(path: Path) -> int:
    """A lock file's descriptor, never through a link (O_NOFOLLOW: a planted link would have us
    create files where another user chose)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise SimclrPathError(f"{path}: cannot open this GPU lock file ({exc.strerror}); "
                              "remove it (the next job makes it again)") from None


def try_claim(count: int, pool: list[str], folder: Path) -> tuple[list[str], list[int]] | None:
    """``count`` GPUs of ``pool`` that no other process holds, with the open lock files' descriptors
    (keep them open: closing one releases its GPU), or None when fewer are free.

    One claim at a time per lock folder (``claim.lock``, held for these few non-blocking tries):
    two jobs each asking for every GPU could otherwise each take a part, give it back and retry
    in step for as long as they kept meeting."""
    import fcntl

    mutex = _open_lock(folder / "claim.lock")
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        got: list[str] = []
        fds: list[int] = []
        for gpu in pool:
            if len(got) == count:
                break
            name = _safe(gpu)  # a UUID, a MIG id
            fd = _open_lock(folder / f"gpu-{name}.lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            got.append(gpu)
            fds.append(fd)
    finally:
        os.close(mutex)  # releases the claim lock; the GPUs' locks stay with their descriptors
    if len(got) < count:
        for fd in fds:
            os.close(fd)
        return None
    return got, fds


def claim(count: int, poll_s: float = 2.0, timeout_s: float | None = None) -> list[str] | None:
    """Claim ``count`` GPUs for this process and what it ``exec``s, and point
    ``CUDA_VISIBLE_DEVICES`` at them; None (nothing changed) for 0 GPUs or none in the machine.

    Raises :class:`SimclrPathError` when the pool has fewer than ``count`` GPUs, or none came
    free within ``timeout_s``.
    """
    if count < 0:
        raise SimclrPathError(f"GPU count {count}: expected 0 or more")
    if count == 0:
        return None
    pool = gpu_pool()
    if not pool:
        return None  # a CPU machine: the job runs on CPU (device auto) or fails with its own message
    if count > len(pool):
        raise SimclrPathError(f"a job asks for {count} GPUs but this machine has {len(pool)} "
                              f"({', '.join(pool)}); lower pretrain_gpus (and --nproc_per_node) "
                              f"to at most {len(pool)}")
    folder = lock_dir()
    start = time.monotonic()
    told = False
    while (got := try_claim(count, pool, folder)) is None:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SimclrPathError(f"no {count} free GPU(s) of {len(pool)} within {timeout_s:.0f} s "
                                  f"(locks in {folder})")
        if not told:
            print(f"waiting for {count} free GPU(s): all {len(pool)} are held by other jobs "
                  f"(locks in {folder})", file=sys.stderr, flush=True)
            told = True
        time.sleep(poll_s)
    gpus, fds = got
    for fd in fds:
        os.set_inheritable(fd, True)  # held by the exec'd command until it exits
    _held.extend(fds)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return gpus


def release() -> None:
    """Give back the GPUs :func:`claim` took in this process (an exec'd command or the process's
    end releases them too)."""
    while _held:
        os.close(_held.pop())


def exec_with_gpus(count: int, command: list[str]) -> None:
    """Claim ``count`` GPUs (:func:`claim`) and replace this process with ``command``; returns
    only by raising :class:`SimclrPathError` (no GPUs free in time, or no such command).

    Leading ``NAME=VALUE`` words set environment variables, as a shell would for a command
    prefix (a ``pretrain_launcher`` such as ``OMP_NUM_THREADS=8 torchrun ...``)."""
    env = dict(os.environ)
    while command and "=" in command[0] and command[0].split("=", 1)[0].isidentifier():
        name, value = command[0].split("=", 1)
        env[name] = value
        command = command[1:]
    if not command:
        raise SimclrPathError("no command given: simclr-path with-gpus N -- COMMAND [ARGS ...]")
    if shutil.which(command[0], path=env.get("PATH")) is None:  # before waiting for GPUs
        raise SimclrPathError(f"cannot run {command[0]!r}: no such command (not on PATH, or not "
                              "executable)", exit_code=127)
    gpus = claim(count)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        print(f"CUDA_VISIBLE_DEVICES={','.join(gpus)}", file=sys.stderr, flush=True)
    with contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    # Python starts with SIGPIPE and SIGXFSZ ignored, and exec keeps ignored signals: the
    # command (a shell pipeline, say) gets the defaults, as subprocess's restore_signals gives
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        release()
        raise SimclrPathError(f"cannot run {command[0]!r}: {exc.strerror}", exit_code=127) from None
