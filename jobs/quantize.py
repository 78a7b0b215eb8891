"""`python jobs/quantize.py ...` = `pcbvlm quantize ...` (pcbvlm.commands.quantize), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.quantize import main

if __name__ == "__main__":
    run_job(main)
