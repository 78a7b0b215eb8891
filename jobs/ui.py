"""`python jobs/ui.py ...` = `pcbvlm ui ...` (pcbvlm.commands.ui), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.ui import main

if __name__ == "__main__":
    run_job(main)
