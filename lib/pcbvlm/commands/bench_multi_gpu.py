"""Several-GPU benchmark of Qwen3-VL-32B QLoRA (random weights) under the accelerate profiles.

pcbvlm bench-multi --profiles ddp,zero2,zero3 --steps 3       # 2 GPUs, 64 layers
pcbvlm bench-multi --profiles cpu-multi --tiny --steps 1      # a CPU rehearsal (gloo)
pcbvlm bench-multi --plot A.json B.json --out profiles.png   # a picture of results files

Each profile is one `accelerate launch --config_file config/accelerate/<profile>.yaml` of this script with
--worker (pcbvlm.bench_multi says what each process measures); the first profile also measures the
1-GPU baseline. Results: <out>.json (+ .md), the ranks' parts beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pcbvlm.cli import make_parser, run_job
from pcbvlm.commands import ROOT


def main(argv=None) -> int:
    parser = make_parser("bench-multi", __doc__.splitlines()[0])
    parser.add_argument("--profiles", default="ddp,zero2,zero3", help="accelerate profiles, comma separated")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/<date>-<gpu>-x<N>.json)"
    )
    parser.add_argument("--cap-gib", type=float, default=80.0, help="memory cap per GPU (80 = an A800 80 GB)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after a warm-up step")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the 32B's 64)")
    parser.add_argument("--layers-for", default="", help="per-profile layers, e.g. zero3=16")
    parser.add_argument("--search", default="18,20,22,24,28,32", help="micro-batches to try, ascending")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per profile's launch")
    parser.add_argument("--timeout-for", default="", help="per-profile seconds, e.g. ddp=230,zero3=110")
    parser.add_argument(
        "--parts-dir", type=Path, help="where the ranks write their parts (default: beside --out)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1-GPU baseline")
    parser.add_argument("--tiny", action="store_true", help="the tiny model's shape (CPU rehearsal)")
    parser.add_argument(
        "--plot", type=Path, nargs="+", metavar="JSON", help="only draw these results files into --out (.png)"
    )
    parser.add_argument("--worker", help=argparse_hidden())
    parser.add_argument("--single", action="store_true", help=argparse_hidden())
    args = parser.parse_args(argv)
    command = shlex.join(["pcbvlm", "bench-multi", *(sys.argv[1:] if argv is None else argv)])
    search = [int(b) for b in args.search.split(",") if b.strip()]

    if args.plot:
        from pcbvlm.bench_multi import plot_profiles, profile_rows
        from pcbvlm.errors import ConfigError

        if not args.out or args.out.suffix != ".png":
            raise ConfigError("--plot needs --out FILE.png")
        rows = profile_rows([json.loads(path.read_text()) for path in args.plot])
        print(f"wrote {plot_profiles(rows, args.out, args.cap_gib)}")
        return 0

    if args.worker:
        from pcbvlm.bench_multi import worker

        worker(args.worker, args.out, args.layers, args.steps, args.cap_gib, search, args.single, args.tiny)
        os._exit(0)  # after an out-of-memory error collectives may be pending: do not wait for them

    import torch

    from pcbvlm.bench_multi import markdown_table, merge_parts
    from pcbvlm.io import atomic_write_json
    from pcbvlm.launch import NO_MULTICAST, accelerate_args, profile_file

    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    for profile in profiles:
        profile_file(profile)  # a typo fails now, not after the first launch
    layers_for = dict(item.split("=") for item in args.layers_for.split(",") if item.strip())
    timeout_for = {k: int(v) for k, v in (i.split("=") for i in args.timeout_for.split(",") if i.strip())}
    gpu = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = args.out or ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y-%m-%d}-{gpu}-x{count}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = (args.parts_dir / out.stem) if args.parts_dir else out.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    launches = {}
    for index, profile in enumerate(profiles):
        layers = layers_for.get(profile, args.layers)
        worker_args = [
            "--worker",
            profile,
            "--out",
            str(prefix),
            "--steps",
            str(args.steps),
            "--cap-gib",
            str(args.cap_gib),
            "--search",
            args.search,
            *(["--layers", str(layers)] if layers else []),
            *(["--single"] if index == 0 and not args.no_baseline else []),
            *(["--tiny"] if args.tiny else []),
        ]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *accelerate_args(profile, "pcbvlm.commands.bench_multi_gpu", worker_args),
        ]
        print(f"==> {profile}: {' '.join(cmd[3:])}", flush=True)
        begin = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_for.get(profile, args.timeout))
        except subprocess.TimeoutExpired:
            stop_launch(proc)
            code = "timeout"
        launches[profile] = {"exit": code, "seconds": round(time.perf_counter() - begin, 1), "layers": layers}
        print(f"==> {profile}: exit {code} after {launches[profile]['seconds']} s", flush=True)
        results = merge_parts(prefix, profiles[: index + 1], launches)
        atomic_write_json(out, results)
    table = markdown_table(results)
    out.with_suffix(".md").write_text(f"`{command}`\n\n{table}")
    print(table)
    print(json.dumps(results["profiles"], indent=1)[:4000])
    print(f"results: {out}")
    return 0


def stop_launch(proc: subprocess.Popen) -> None:
    """Kill a launch and every worker it started. torch's elastic agent starts each worker in a session
    of its own, so killing the launcher's process group alone left the workers running (and holding
    their GPUs) after a timeout; they are found as the launcher's descendants first."""
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    run_job(main)
