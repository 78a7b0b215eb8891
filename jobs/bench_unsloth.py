"""Unsloth side by side with this project's training on the same work (pcbvlm.bench_unsloth).

Each step is its own process (`import unsloth` patches transformers for the whole process):
python jobs/bench_unsloth.py checkpoint --checkpoint /tmp/ckpt --layers 16   # random 32B-shape folder
python jobs/bench_unsloth.py unsloth --checkpoint /tmp/ckpt --out unsloth.json --steps 3
python jobs/bench_unsloth.py ours --checkpoint /tmp/ckpt --out ours.json --steps 3
python jobs/bench_unsloth.py table --out ours.json --unsloth unsloth.json --png x.png  # table, picture
Add --narrow to `checkpoint` for a tiny-width model (a CPU dry run of every step).
"""

from __future__ import annotations

import json
from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.errors import UserError


def main(argv=None) -> int:
    parser = make_parser("bench_unsloth", __doc__.splitlines()[0])
    parser.add_argument("step", choices=["checkpoint", "unsloth", "ours", "table"])
    parser.add_argument("--checkpoint", type=Path, help="the random checkpoint folder")
    parser.add_argument("--out", type=Path, help="results JSON of this step")
    parser.add_argument("--unsloth", type=Path, help="table: Unsloth's results JSON")
    parser.add_argument("--layers", type=int, help="checkpoint: decoder layers (default: the 32B's 64)")
    parser.add_argument("--narrow", action="store_true", help="checkpoint: tiny width (CPU dry run)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    parser.add_argument("--micro-batches", default="16", help="unsloth: micro-batch sizes, comma separated")
    parser.add_argument("--cap-gib", type=float, default=80.0, help="memory cap (80 = an A800 80 GB)")
    parser.add_argument("--no-4bit", action="store_true", help="unsloth: bf16 base (CPU dry run)")
    parser.add_argument("--png", type=Path, help="table: also draw the rows into this picture")
    parser.add_argument("--deadline-s", type=float, help="ours: skip rows after this many seconds")
    parser.add_argument(
        "--plan",
        choices=[
            "offload",
            "offload-check",
            "levers",
            "compile",
            "compile-eager",
            "skip",
            "skip-eager",
            "final",
            "final-eager",
            "ratio",
        ],
        default="offload",
        help="ours: which rows (offload: offloaded checkpoints + gradient accumulation; offload-check: its "
        "follow-up, offloading on/off in one run; levers: the fused LoRA adds / SwiGLU rows of the first two "
        "2026-11-30 runs; compile: compiled decoder layers; compile-eager: the same rows eager, and naive; skip: down_proj not "
        "recomputed, compiled, with memory and idle-time traces; skip-eager: its eager rows and naive; final, final-eager: the same with the one-launch NF4 "
        "dequantization; ratio: naive first, then the fastest setting)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="unsloth: one more step under torch.profiler per row"
    )
    parser.add_argument(
        "--memory-goal-gib",
        type=float,
        help="ours, plans offload, compile and skip: the memory cap of the row that must not use more than Unsloth (its peak)",
    )
    args = parser.parse_args(argv)

    if args.step == "table":
        from pcbvlm.bench_unsloth import markdown_table

        ours = _read(args.out)
        theirs = _read(args.unsloth)
        print(markdown_table(ours, theirs))
        if args.png:
            from pcbvlm.bench_unsloth import plot

            print(f"picture: {plot(ours, theirs, args.png)}")
        return 0
    if args.checkpoint is None:
        raise UserError(f"{args.step}: --checkpoint is required")
    import_s = None
    if args.step == "unsloth":  # before anything imports transformers (pcbvlm.bench_unsloth does)
        import time

        begin = time.perf_counter()
        import unsloth  # noqa: F401

        import_s = round(time.perf_counter() - begin, 1)
    from pcbvlm import bench_unsloth

    cfg = config_from_args(args)

    if args.step == "checkpoint":
        bench_unsloth.save_random_checkpoint(args.checkpoint, args.layers, narrow=args.narrow, cfg=cfg)
        return 0
    if not (args.checkpoint / "config.json").is_file():
        raise UserError(f"--checkpoint: {args.checkpoint}/config.json not found (run the checkpoint step)")
    if args.out is None:
        raise UserError(f"{args.step}: --out is required")
    if args.step == "unsloth":
        batches = tuple(int(b) for b in args.micro_batches.split(",") if b.strip())
        bench_unsloth.run_unsloth(
            args.out,
            args.checkpoint,
            args.steps,
            batches,
            args.cap_gib,
            not args.no_4bit,
            cfg,
            import_s,
            profile=args.profile,
        )
    else:
        bench_unsloth.run_ours(
            args.out,
            args.checkpoint,
            args.steps,
            args.cap_gib,
            args.deadline_s,
            cfg,
            plan=args.plan,
            memory_goal_gib=args.memory_goal_gib,
        )
    return 0


def _read(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None


if __name__ == "__main__":
    run_job(main)
