"""GPU claims for workflow jobs: each job gets GPUs no other job holds (no GPU needed: the pool
comes from CUDA_VISIBLE_DEVICES, which the wrapper reads without querying CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from simclr_path import gpus as G
from simclr_path.errors import SimclrPathError

SHOW = [sys.executable, "-c", "import os, sys; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"]


def _env(tmp_path, visible: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*G.SCHEDULER_VARS, "CUDA_VISIBLE_DEVICES")}
    env[G.LOCK_ROOT_VAR] = str(tmp_path)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return {**env, **extra}


def _wrap(count: int, command: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simclr_path", "with-gpus", str(count), "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_concurrent_jobs_get_different_gpus_and_the_lock_ends_with_the_command(tmp_path):
    env = _env(tmp_path, "0,1,2")
    hold = [sys.executable, "-c",
            "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(30)"]
    first = _wrap(2, hold, env)
    try:
        assert first.stdout.readline().strip() == "0,1"  # held until the command exits
        second = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", *SHOW],
                                capture_output=True, text=True, env=env, timeout=60, check=True)
        assert second.stdout.strip() == "2"
        # all three taken by two jobs: a third job waits, and says so once
        holder = _wrap(1, hold, env)
        assert holder.stdout.readline().strip() == "2"
        waiting = _wrap(1, SHOW, env)
        time.sleep(3)
        assert waiting.poll() is None
        first.kill()  # however the command ends, its GPUs come free
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0 and out.strip() in ("0", "1")
        assert err.count("waiting for 1 free GPU") == 1
        holder.kill()
        holder.wait()
    finally:
        first.kill()
        first.wait()


def test_the_command_exit_status_and_output_pass_through(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", sys.executable, "-c",
                          "import sys; print('ok'); sys.exit(3)"],
                         capture_output=True, text=True, env=_env(tmp_path, "5"), timeout=60, check=False)
    assert res.returncode == 3 and res.stdout.strip() == "ok"
    assert "CUDA_VISIBLE_DEVICES=5" in res.stderr


@pytest.mark.parametrize("count", ["0", "1"])
def test_the_command_starts_with_default_signal_handling(tmp_path, count):
    """Python ignores SIGPIPE and SIGXFSZ, and exec would keep that for the command: a pipeline
    in a job would print 'Broken pipe' and fail instead of ending quietly."""
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", count, "--", "sh", "-c",
                          "yes | head -n 1"], capture_output=True, text=True,
                         env=_env(tmp_path, "5"), timeout=60, check=False)
    assert res.returncode == 0 and res.stdout == "y\n" and "Broken pipe" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", count, "--", "grep",
                          "SigIgn", "/proc/self/status"], capture_output=True, text=True,
                         env=_env(tmp_path, "5"), timeout=60, check=True)
    ignored = int(res.stdout.split()[1], 16)  # bit n - 1 is signal n
    assert not ignored & (1 << (13 - 1)) and not ignored & (1 << (25 - 1)), res.stdout


def test_zero_gpus_runs_the_command_unchanged(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "0", "--", *SHOW],
                         capture_output=True, text=True, env=_env(tmp_path, "3,7"), timeout=60,
                         check=True)
    assert res.stdout.strip() == "3,7"
    assert not list(tmp_path.glob("simclr-path-gpus-*/*.lock"))


def test_jobs_of_one_scheduler_allocation_share_its_gpus_and_other_allocations_do_not_wait(tmp_path):
    hold = [sys.executable, "-c",
            "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(30)"]
    # a workflow run inside one SLURM allocation of GPUs 4 and 6: its jobs split them
    first = _wrap(1, hold, _env(tmp_path, "4,6", SLURM_JOB_ID="42"))
    try:
        assert first.stdout.readline().strip() == "4"
        same = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", *SHOW],
                              capture_output=True, text=True, timeout=60, check=True,
                              env=_env(tmp_path, "4,6", SLURM_JOB_ID="42"))
        assert same.stdout.strip() == "6"
        # a job the SLURM executor submitted on its own sees its one GPU as 0, whatever others hold
        other = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", *SHOW],
                               capture_output=True, text=True, timeout=60, check=True,
                               env=_env(tmp_path, "0", SLURM_JOB_ID="43"))
        assert other.stdout.strip() == "0"
        mine = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", *SHOW],
                              capture_output=True, text=True, timeout=60, check=True,
                              env=_env(tmp_path, "4"))  # no scheduler: the user's own pool
        assert mine.stdout.strip() == "4"
    finally:
        first.kill()
        first.wait()


def test_environment_settings_before_the_command_are_applied(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", "OMP_NUM_THREADS=3",
                          "FOO_BAR=a=b", sys.executable, "-c",
                          ("import os; print(os.environ['OMP_NUM_THREADS'], os.environ['FOO_BAR'], "
                          "os.environ['CUDA_VISIBLE_DEVICES'])")],
                         capture_output=True, text=True, env=_env(tmp_path, "2"), timeout=60, check=True)
    assert res.stdout.split() == ["3", "a=b", "2"]


def test_more_gpus_than_the_machine_has_is_one_clear_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "4", "--", *SHOW],
                         capture_output=True, text=True, env=_env(tmp_path, "0,1"), timeout=60, check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "asks for 4 GPUs" in res.stderr
    assert "at most 2" in res.stderr and "Traceback" not in res.stderr


def test_a_command_that_does_not_exist_is_one_clear_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simclr_path", "with-gpus", "1", "--", "no-such-cmd-xyz"],
                         capture_output=True, text=True, env=_env(tmp_path, "0"), timeout=60, check=False)
    assert res.returncode == 127 and "cannot run 'no-such-cmd-xyz'" in res.stderr
    assert res.stderr.startswith("simclr-path with-gpus: error:")
    assert "Traceback" not in res.stderr


def test_claims_take_turns_so_two_jobs_asking_for_every_gpu_cannot_split_them(tmp_path):
    """Each took GPUs in pool order without waiting: job A held GPU 0 while job B, starting
    on its own, could hold 1; both gave back and retried in step."""
    import fcntl
    import threading

    folder = tmp_path
    mutex = os.open(folder / "claim.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(mutex, fcntl.LOCK_EX)  # another job in the middle of its claim
    result: list = []
    worker = threading.Thread(target=lambda: result.append(G.try_claim(2, ["0", "1"], folder)))
    worker.start()
    try:
        time.sleep(0.5)
        assert worker.is_alive() and not result  # waits its turn, touching no GPU lock
        for gpu in ("0", "1"):  # so the other job's claim can complete
            fd = os.open(folder / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the waiting job took it
            os.close(fd)
    finally:
        os.close(mutex)
        worker.join(timeout=10)
    assert result and result[0] is not None and result[0][0] == ["0", "1"]
    for fd in result[0][1]:
        os.close(fd)


def test_claim_in_process_sets_the_devices_and_times_out_when_all_are_held(tmp_path, monkeypatch):
    monkeypatch.setenv(G.LOCK_ROOT_VAR, str(tmp_path))
    for var in G.SCHEDULER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")  # UUIDs are ids too
    held = G.try_claim(1, ["GPU-1a2b"], G.lock_dir())
    assert held is not None
    try:
        assert G.claim(1) == ["GPU-3c4d"] and os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-3c4d"
        with pytest.raises(SimclrPathError, match="no 1 free GPU"):  # both held now
            G.claim(1, poll_s=0.05, timeout_s=0.2)
        G.release()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")
        assert G.claim(1) == ["GPU-3c4d"]  # released: free again
        G.release()
    finally:
        for fd in held[1]:
            os.close(fd)
    with pytest.raises(SimclrPathError, match="expected 0 or more"):
        G.claim(-1)


def test_pool_without_a_gpu_driver_is_empty_and_with_one_asks_torch(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(G, "GPU_DRIVER_PATHS", (str(tmp_path / "none"),))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch asked"))
    assert G.gpu_pool() == []
    monkeypatch.setattr(G, "GPU_DRIVER_PATHS", (str(tmp_path),))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert G.gpu_pool() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert G.gpu_pool() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # hides every GPU
    assert G.gpu_pool() == []
    # CUDA stops at the first invalid entry: what follows it is not visible either
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")
    assert G.gpu_pool() == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,,4")
    assert G.gpu_pool() == ["3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a,MIG-1c3d")  # UUIDs are entries too
    assert G.gpu_pool() == ["GPU-8f2a", "MIG-1c3d"]


def test_a_lock_folder_others_can_write_or_a_planted_link_is_refused(tmp_path, monkeypatch):
    """The folder name in /tmp is predictable: another user's folder, or a link planted in ours,
    could hold our GPUs or have us create files where they chose."""
    monkeypatch.setenv(G.LOCK_ROOT_VAR, str(tmp_path))
    for var in G.SCHEDULER_VARS:
        monkeypatch.delenv(var, raising=False)
    folder = G.lock_dir()
    folder.chmod(0o777)
    with pytest.raises(SimclrPathError, match="not a folder of yours that only you can write"):
        G.lock_dir()
    folder.chmod(0o700)
    (folder / "claim.lock").symlink_to(tmp_path / "planted")
    with pytest.raises(SimclrPathError, match=r"claim.lock: cannot open this GPU lock file"):
        G.try_claim(1, ["0"], folder)
    assert not (tmp_path / "planted").exists()
