"""GPU benchmark of a 32B model (random weights; Qwen3-VL-32B by default): training and generation speed, memory.

make bench                                   # full run, results to bench/results/<date>-<gpu>.json
pcbvlm bench --layers 2 --steps 1    # a smoke run of a 2-layer cut of the same width
pcbvlm bench --layers 8 --plan explore --profile --static-batches 1,128   # the wider sweep
pcbvlm bench --parts int4 --batches 1,32,128 --static-batches 1 --nf4-batches 1 --new-tokens 230
                                             # the quantized model's int4 paths (pcbvlm.int4) vs NF4
pcbvlm bench --parts int4 --smoke --batches 1,8 --static-batches 1 --new-tokens 8   # on a CPU
pcbvlm bench --family qwen2_5_vl ...       # the same on Qwen2.5-VL-32B's shape (pcbvlm.families)
bash bench/gpu/issue16.sh                    # + the graph decoder, drafts and the triton int4 layout
"""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

from pcbvlm.cli import make_parser, run_job
from pcbvlm.commands import ROOT
from pcbvlm.errors import UserError
from pcbvlm.families import FAMILIES


def main(argv=None) -> int:
    parser = make_parser("bench", __doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-<gpu>.json)")
    parser.add_argument("--cap-gib", type=float, default=80.0, help="memory cap (80 = an A800 80 GB)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per training setting")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the 32B's 64)")
    parser.add_argument(
        "--family",
        default="qwen3_vl",
        help=f"model family whose 32B shape is built ({', '.join(sorted(FAMILIES))})",
    )
    parser.add_argument("--parts", default="train,generate", help="train, generate or both (comma separated)")
    parser.add_argument("--batches", default="1,32,128,192", help="generation batch sizes")
    parser.add_argument("--new-tokens", type=int, default=170, help="tokens generated per image (forced)")
    parser.add_argument("--static-batches", default="", help="generation batch sizes with a static KV cache")
    parser.add_argument(
        "--plan", choices=["full", "headline", "explore"], default="full", help="training settings"
    )
    parser.add_argument("--profile", action="store_true", help="profile one step of the marked settings")
    parser.add_argument("--nf4-batches", default="", help="--parts int4: NF4 batch sizes to compare with")
    parser.add_argument(
        "--tinygemm-batches", default="", help="--parts int4: batch sizes also run on the tinygemm layout"
    )
    parser.add_argument("--prompt-lookup", type=int, default=0, help="--parts int4: draft tokens at batch 1")
    parser.add_argument(
        "--deadline-s", type=float, help="--parts int4: skip settings after this many seconds"
    )
    parser.add_argument(
        "--graph-batches", default="", help="--parts int4: batch sizes through pcbvlm.graphdecode"
    )
    parser.add_argument(
        "--graph-drafts", default="", help="--parts int4: drafted tokens per step, graph decoder, batch 1"
    )
    parser.add_argument(
        "--graph-kernels", default="tinygemm", help="--parts int4: int4 layouts of the graph decoder rows"
    )
    parser.add_argument(
        "--graph-compile",
        choices=["off", "on", "both"],
        default="off",
        help="--parts int4: graph decoder rows with the step through torch.compile (both: plain, then compiled)",
    )
    parser.add_argument(
        "--kernel-floor", action="store_true", help="--parts int4: time the int4 linears alone per layout"
    )
    parser.add_argument(
        "--static-last",
        action="store_true",
        help="--parts int4: transformers' compiled static-cache rows after NF4 (a deadline cuts them first)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="--parts int4: a narrow 2-layer model, CPU allowed"
    )
    args = parser.parse_args(argv)
    command = shlex.join(["pcbvlm", "bench", *(sys.argv[1:] if argv is None else argv)])

    graph_kernels = tuple(k.strip() for k in args.graph_kernels.split(",") if k.strip())
    from pcbvlm.int4 import Kernel

    unknown = sorted(set(graph_kernels) - set(get_args(Kernel)))
    if unknown:
        raise UserError(
            f"--graph-kernels: unknown int4 layout {', '.join(unknown)} ({', '.join(get_args(Kernel))})"
        )

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        raise UserError(
            "the benchmark needs a CUDA GPU (it builds the 32B model on it); --smoke runs on a CPU"
        )
    from pcbvlm.bench import markdown_table, run_benchmark
    from pcbvlm.families import get_family

    get_family(args.family, "--family")  # one line naming the known families, before any GPU work

    gpu = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
    out = args.out or ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y-%m-%d}-{gpu}.json"
    if args.parts == "int4":
        from pcbvlm.bench import int4_chart, int4_markdown_table, run_int4_benchmark

        results = run_int4_benchmark(
            out,
            batches=_sizes(args.batches),
            static_batches=_sizes(args.static_batches),
            nf4_batches=_sizes(args.nf4_batches),
            prompt_lookup=args.prompt_lookup,
            tinygemm_batches=_sizes(args.tinygemm_batches),
            new_tokens=args.new_tokens,
            cap_gib=args.cap_gib,
            layers=args.layers,
            deadline_s=args.deadline_s,
            smoke=args.smoke,
            family=args.family,
            graph_batches=_sizes(args.graph_batches),
            graph_drafts=_sizes(args.graph_drafts),
            graph_kernels=graph_kernels,
            graph_compile={"off": (False,), "on": (True,), "both": (False, True)}[args.graph_compile],
            kernel_floor=args.kernel_floor,
            static_last=args.static_last,
        )
        table = int4_markdown_table(results)
        int4_chart(results, out.with_suffix(".png"))
        out.with_suffix(".md").write_text(f"`{command}`\n\n{table}")
        print(table)
        print(f"results: {out}")
        return 0
    results = run_benchmark(
        out,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        cap_gib=args.cap_gib,
        steps=args.steps,
        layers=args.layers,
        generate_batches=tuple(int(b) for b in args.batches.split(",")),
        new_tokens=args.new_tokens,
        plan=args.plan,
        profile=args.profile,
        static_cache_batches=tuple(int(b) for b in args.static_batches.split(",") if b.strip()),
        family=args.family,
    )
    table = markdown_table(results)
    (out.with_suffix(".md")).write_text(f"`{command}`\n\n{table}")
    print(table)
    print(f"results: {out}")
    return 0


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",") if b.strip())


if __name__ == "__main__":
    run_job(main)
