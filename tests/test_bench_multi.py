"""The multi-GPU benchmark's driver (jobs/bench_multi_gpu.py): what it does when a launch runs past its time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil


def test_a_timed_out_launch_leaves_no_worker_running(tmp_path):
    """torch's elastic agent starts each worker in a session of its own, so killing the launcher's process
    group alone left the workers running (holding their GPUs while the next profile started). A launcher
    that starts its worker the same way: after stop_launch, neither is left."""
    from jobs.bench_multi_gpu import stop_launch

    pid_file = tmp_path / "worker.pid"
    launcher = textwrap.dedent(
        f"""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(worker.pid))
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    worker_pid = None
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                worker_pid = int(pid_file.read_text())
                break
            time.sleep(0.1)
        assert worker_pid is not None, "the launcher did not start its worker"
        stop_launch(proc)
        assert proc.returncode is not None
        alive = psutil.pid_exists(worker_pid) and psutil.Process(worker_pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, "the worker outlived its launch"
    finally:
        for pid in (proc.pid, worker_pid):
            if pid and psutil.pid_exists(pid):
                psutil.Process(pid).kill()
