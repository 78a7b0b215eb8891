"""`python jobs/infer.py ...` = `pcbvlm infer ...` (pcbvlm.commands.infer), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.infer import main

if __name__ == "__main__":
    run_job(main)
