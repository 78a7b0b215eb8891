"""`python jobs/synth_data.py ...` = `pcbvlm synth ...` (pcbvlm.commands.synth_data), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.synth_data import main

if __name__ == "__main__":
    run_job(main)
