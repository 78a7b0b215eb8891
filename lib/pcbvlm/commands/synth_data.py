"""`make synth`: write a synthetic DeepPCB-layout dataset (for the demo and tests; the real one is research-only).

Usage: pcbvlm synth --num N --out DIR [--seed S] [--size 640] [--config YAML] [--set k=v]
       [--width W --height H] [--scale F] [--max-defects K] [--order drawn|reading]
Exit codes: 0 written, 2 bad arguments or an --out folder that is not an earlier synthetic dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.synth import Board, generate_dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(
        "synth", "Generate synthetic PCB pairs with annotated defects in the DeepPCB layout."
    )
    parser.add_argument(
        "--num", type=int, required=True, help="number of samples (every third goes to test.txt)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write (it will hold PCBData/)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--size", type=int, default=640, help="image side in pixels (DeepPCB: 640)")
    parser.add_argument("--width", type=int, help="board width in pixels (non-square boards; default --size)")
    parser.add_argument("--height", type=int, help="board height in pixels (default --size)")
    parser.add_argument(
        "--scale", type=float, help="feature size, 1.0 = as on a 640 px DeepPCB scan (default: board / 640)"
    )
    parser.add_argument(
        "--max-defects", type=int, default=6, help="1 to this many defects per board (default 6)"
    )
    parser.add_argument(
        "--order",
        choices=["drawn", "reading"],
        default="drawn",
        help="order of the defects in the annotation",
    )
    args = parser.parse_args(argv)
    config_from_args(args)  # a bad --config / --set fails here like in every other job
    board = None
    if args.width or args.height or args.scale or args.max_defects != 6 or args.order != "drawn":
        board = Board(
            args.width or args.size, args.height or args.size, args.scale, args.max_defects, args.order
        )
    summary = generate_dataset(args.out, args.num, seed=args.seed, size=args.size, progress=True, board=board)
    boxes = ", ".join(f"{name} {n}" for name, n in summary["boxes"].items())
    print(
        f"wrote {args.out}/PCBData: {summary['samples']['trainval']} trainval + {summary['samples']['test']} test "
        f"samples, {sum(summary['boxes'].values())} defects ({boxes}), seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    run_job(main)
