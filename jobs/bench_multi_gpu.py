"""`python jobs/bench_multi_gpu.py ...` = `pcbvlm bench-multi ...` (pcbvlm.commands.bench_multi_gpu), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.bench_multi_gpu import main

if __name__ == "__main__":
    run_job(main)
