"""`python jobs/train.py ...`: one training process, without a launcher (pcbvlm.commands.train); `pcbvlm train`
runs it under `accelerate launch` with the configured profile."""

from pcbvlm.cli import run_job
from pcbvlm.commands.train import main

if __name__ == "__main__":
    run_job(main)
