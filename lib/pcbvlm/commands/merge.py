"""Merge the trained LoRA adapter into the unquantized base model and verify the merged logits.

    make merge [ADAPTER=run-or-adapter-folder] [CONFIG=...] [SET="resources.merge_device=cuda"]
    pcbvlm merge [--adapter PATH] [--out DIR]

Default adapter: the newest finished run under paths.runs_dir; default output: <paths.outputs_dir>/merged.
Exit codes: 0 merged and verified, 1 refused or verification failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pcbvlm.cli import config_from_args, data_folder_line, make_parser, run_job


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("merge", __doc__.splitlines()[0])
    parser.add_argument(
        "--adapter",
        type=Path,
        help="a run folder or its adapter/ folder (default: the newest finished run)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <paths.outputs_dir>/merged)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if cfg.quantize.verify_samples:
        print(data_folder_line(cfg, "verifies on"), flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pcbvlm.merge import merge_adapter, print_summary

    result = merge_adapter(cfg, adapter=args.adapter, out=args.out)
    print_summary(result)
    return 0


if __name__ == "__main__":
    run_job(main)
