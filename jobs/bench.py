"""`python jobs/bench.py ...` = `pcbvlm bench ...` (pcbvlm.commands.bench), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.bench import main

if __name__ == "__main__":
    run_job(main)
