"""`python jobs/merge.py ...` = `pcbvlm merge ...` (pcbvlm.commands.merge), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.merge import main

if __name__ == "__main__":
    run_job(main)
