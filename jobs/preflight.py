"""`python jobs/preflight.py ...` = `pcbvlm preflight ...` (pcbvlm.commands.preflight), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.preflight import main

if __name__ == "__main__":
    run_job(main)
