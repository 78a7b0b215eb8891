"""`make learn`: train a small Qwen3-VL from scratch on fresh synthetic boards; held-out learning curve.

    pcbvlm learn [--size base|demo|micro] [--seconds 300] [--out DIR] [--save DIR] [...]

Writes DIR/curve.json (settings, every evaluation, final held-out DeepPCB figures) and DIR/curve.png;
--save also writes the trained model as a Hugging Face folder. Needs a GPU to get anywhere in minutes;
on a CPU it runs (tiny settings) to check the code. The logic lives in pcbvlm.learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job


def main(argv: Sequence[str] | None = None) -> int:
    from pcbvlm.learn import SIZES, LearnSettings, learn

    parser = make_parser("learn", __doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="model size (default base)")
    parser.add_argument("--out", type=Path, default=Path("outputs/learn"), help="folder for curve.json/png")
    parser.add_argument("--save", type=Path, help="save the trained model to this folder")
    defaults = LearnSettings()
    for f in fields(LearnSettings):
        if f.name == "size":
            continue
        value = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(value), default=value, help=f"default {value}"
        )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    settings = LearnSettings(**{f.name: getattr(args, f.name) for f in fields(LearnSettings)})
    result = learn(settings, cfg, args.out, save=args.save)
    final = result["final"]
    print(
        f"learn: {result['samples_seen']} samples in {result['train_seconds']} s "
        f"({result['samples_per_s']} samples/s); held-out ({result['heldout']}): "
        f"P {final['precision']:.4f} R {final['recall']:.4f} F {final['fscore']:.4f} AP {final['ap']:.4f}"
    )
    print(f"wrote {args.out}/curve.json, curve.png" + (f"; model {args.save}" if args.save else ""))
    return 0


if __name__ == "__main__":
    run_job(main)
