"""`python jobs/prepare_data.py ...` = `pcbvlm data ...` (pcbvlm.commands.prepare_data), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.prepare_data import main

if __name__ == "__main__":
    run_job(main)
