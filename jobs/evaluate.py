"""`python jobs/evaluate.py ...` = `pcbvlm eval ...` (pcbvlm.commands.evaluate), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.evaluate import main

if __name__ == "__main__":
    run_job(main)
