"""`python jobs/learn.py ...` = `pcbvlm learn ...` (pcbvlm.commands.learn), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.learn import main

if __name__ == "__main__":
    run_job(main)
