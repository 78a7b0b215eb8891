"""`python jobs/demo.py ...` = `pcbvlm demo ...` (pcbvlm.commands.demo), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.demo import main

if __name__ == "__main__":
    run_job(main)
