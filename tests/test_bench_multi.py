"""The multi-GPU benchmark's driver (`pcbvlm bench-multi`): a timed-out launch, the picture of results files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil

from conftest import ROOT


def test_a_timed_out_launch_leaves_no_worker_running(tmp_path):
    """torch's elastic agent starts each worker in a session of its own, so killing the launcher's process
    group alone left the workers running (holding their GPUs while the next profile started). A launcher
    that starts its worker the same way: after stop_launch, neither is left."""
    from pcbvlm.commands.bench_multi_gpu import stop_launch

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


def test_the_measured_results_files_give_one_row_per_setting_and_a_picture(tmp_path):
    """The shipped 2-GPU results (DDP run; ZeRO-2 + ZeRO-3 run): each run's 1-GPU baseline, then its
    profiles, with the figures BENCHMARKS.md quotes; the picture is a PNG."""
    import json

    from pcbvlm.bench_multi import plot_profiles, profile_rows

    results = ROOT / "bench" / "results"
    docs = [
        json.loads((results / name).read_text())
        for name in ("2026-11-29-NVIDIA-H200-x2-ddp.json", "2026-11-30-NVIDIA-H200-x2-zero.json")
    ]
    rows = profile_rows(docs)
    assert [(r["label"], r["layers"], r["samples_per_s"], r["peak_gib"]) for r in rows] == [
        ("1 GPU (ddp run)", 64, 3.923, 65.67),
        ("ddp, 2 GPUs", 64, 7.614, 69.67),
        ("1 GPU (zero2 run)", 64, 4.01, 65.67),
        ("zero2, 2 GPUs", 64, 7.796, 62.97),
        ("zero3, 2 GPUs", 16, 13.86, 50.05),
    ]
    out = plot_profiles(rows, tmp_path / "profiles.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_plot_without_a_png_target_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "bench_multi_gpu.py"),
            "--plot",
            "x.json",
            "--out",
            str(tmp_path / "x.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --plot needs --out FILE.png"
    assert "Traceback" not in proc.stderr
