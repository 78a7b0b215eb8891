"""Fine-tune Qwen3-VL with QLoRA on the converted DeepPCB data.

One training process. `make train [RESUME=auto|no|path] [CONFIG=...] [SET="train.lr=5e-5"] [PROFILE=ddp]` =
`pcbvlm train` (pcbvlm.launch) runs it under `accelerate launch --config_file config/accelerate/<profile>.yaml
--module pcbvlm.commands.train [--resume auto]`, with the profile the resolved config (or PROFILE) names.
"""

from __future__ import annotations

import logging
import os

from pcbvlm.cli import config_from_args, make_parser, run_job

# The CUDA allocator's expandable segments keep its reserved memory close to what is allocated: on the
# H200, capped at 31.43 GiB, the 32B's all-checkpointed step ran out of memory with 30.54 GiB allocated
# without them and ran with them (BENCHMARKS.md, issue 20; Unsloth sets the same for its process). Read
# by torch >= 2.10 when CUDA starts; a user's own allocator setting wins.
ALLOCATOR_SETTING = "expandable_segments:True"


def default_allocator_setting(env: dict | None = None) -> None:
    """Set PYTORCH_ALLOC_CONF to expandable segments unless an allocator setting is already there."""
    env = os.environ if env is None else env
    if not any(env.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        env["PYTORCH_ALLOC_CONF"] = ALLOCATOR_SETTING


def main(argv=None) -> int:
    default_allocator_setting()  # before anything starts CUDA
    parser = make_parser("train", __doc__.splitlines()[0])
    parser.add_argument(
        "--resume",
        default=os.environ.get("RESUME") or "auto",
        help="auto (newest unfinished run of this config), no (start over), or a run/checkpoint folder",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pcbvlm.training import print_summary, train

    result = train(cfg, resume=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        if result.status == "already finished":
            print(
                f"{result.run_dir.name} is already trained ({result.adapter_dir}); RESUME=no trains a new run"
            )
        else:
            print_summary(result)
    return 0


if __name__ == "__main__":
    run_job(main)
