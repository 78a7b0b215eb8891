"""`make data`: convert DeepPCB (DEEPPCB_DIR, the folder holding PCBData/) to train/val/test jsonl.

Usage: python jobs/prepare_data.py [--deeppcb-dir DIR] [--out DIR] [--strict] [--config YAML] [--set k=v]
Exit codes: 0 written, 2 bad input (missing PCBData or split file; with --strict, any problem).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.deeppcb import prepare_data


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(
        "prepare_data", "Convert DeepPCB to Qwen3-VL grounding jsonl (train/val/test + stats)."
    )
    parser.add_argument(
        "--deeppcb-dir",
        type=Path,
        help="folder holding PCBData/ (or PCBData itself); default paths.deeppcb_dir",
    )
    parser.add_argument("--out", type=Path, help="output folder; default paths.data_dir")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="any problem (bad line, missing image, ...) is an error: exit 2, nothing written",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    prepare_data(cfg, deeppcb_dir=args.deeppcb_dir, out_dir=args.out, strict=args.strict)
    return 0


if __name__ == "__main__":
    run_job(main)
