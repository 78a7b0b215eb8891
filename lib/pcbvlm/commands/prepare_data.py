"""`make data`: convert a labelled dataset (FORMAT=deeppcb|coco|yolo|voc, SRC=<folder>) to train/val/test jsonl.

Usage: pcbvlm data [--format NAME] [--src DIR | --deeppcb-dir DIR] [--out DIR] [--strict]
                                   [--config YAML] [--set k=v]
Exit codes: 0 written, 2 bad input (missing layout files; with --strict, any problem).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pcbvlm.cli import config_from_args, data_folder_line, make_parser, run_job
from pcbvlm.datasets import FORMATS, prepare_data


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("data", "Convert a labelled dataset to grounding jsonl (train/val/test + stats).")
    parser.add_argument(
        "--format",
        default="deeppcb",
        choices=list(FORMATS),
        help="layout of the source: " + "; ".join(f"{name}: {fmt.layout}" for name, fmt in FORMATS.items()),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--src", type=Path, help="the dataset folder (DeepPCB: default paths.deeppcb_dir)")
    source.add_argument(
        "--deeppcb-dir",
        type=Path,
        help="folder holding PCBData/ (or PCBData itself); the same as --src for --format deeppcb",
    )
    parser.add_argument("--out", type=Path, help="output folder; default paths.data_dir")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="any problem (bad line, missing image, ...) is an error: exit 2, nothing written",
    )
    args = parser.parse_args(argv)
    if args.deeppcb_dir is not None and args.format != "deeppcb":
        parser.error(f"--deeppcb-dir is for --format deeppcb; give the {args.format} folder with --src")
    cfg = config_from_args(args)
    print(data_folder_line(cfg, "writes", args.out), flush=True)
    prepare_data(
        cfg,
        source=args.src or args.deeppcb_dir,
        out_dir=args.out,
        strict=args.strict,
        fmt=args.format,
    )
    return 0


if __name__ == "__main__":
    run_job(main)
