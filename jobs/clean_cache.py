"""`python jobs/clean_cache.py ...` = `pcbvlm clean-cache ...` (pcbvlm.commands.clean_cache), kept for recorded commands."""

from pcbvlm.cli import run_job
from pcbvlm.commands.clean_cache import main

if __name__ == "__main__":
    run_job(main)
