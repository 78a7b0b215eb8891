"""Evaluate detections on a converted DeepPCB split: DeepPCB protocol, COCO mAP, report with overlays.

    python -m jobs.evaluate --predictions P [--data-dir D] [--split test] [--out DIR]   score a file
    python -m jobs.evaluate [--model PATH|merged|quantized] [--split test] [--out DIR]  run a model
    python -m jobs.evaluate --compare DIR_A DIR_B [--out DIR]                           side by side

Settings come from the config (--config / --set, e.g. --set eval.limit=50); --data-dir and --split
override paths.data_dir and eval.split. The logic lives in pcbvlm.evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.config import Config, write_resolved
from pcbvlm.evaluate import (
    SPLITS,
    load_scoring_samples,
    read_predictions,
    score_predictions,
    write_comparison,
)
from pcbvlm.io import atomic_write_jsonl


def _generate(
    cfg: Config, model_path: str, samples: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    from pcbvlm.generate import generate_predictions

    predictions, images_per_s = generate_predictions(
        cfg, model_path, samples, cfg.eval.batch_size, cfg.eval.max_new_tokens
    )
    return list(predictions), images_per_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument(
        "--predictions", type=Path, help="score this predictions.jsonl instead of running a model"
    )
    parser.add_argument(
        "--model",
        help="a run, adapter, merged or quantized folder, a hub id, or a shortcut: run (newest finished run), merged, quantized, base, auto (default: quantized, else merged, else the newest run, else the base)",
    )
    parser.add_argument("--data-dir", type=Path, help="converted data folder (default: paths.data_dir)")
    parser.add_argument("--split", choices=SPLITS, help="split to evaluate (default: eval.split)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("DIR_A", "DIR_B"), help="compare two evaluations"
    )
    args = parser.parse_args(argv)
    if args.compare and (args.predictions or args.model):
        parser.error("--compare takes neither --predictions nor --model")
    if args.predictions and args.model:
        parser.error("give --predictions or --model, not both")
    cfg = config_from_args(args)

    if args.compare:
        dir_a, dir_b = args.compare
        out = args.out or cfg.paths.outputs_dir / "eval" / f"compare-{dir_a.name}-vs-{dir_b.name}"
        path = write_comparison(dir_a, dir_b, out)
        print(path.read_text(encoding="utf-8"), end="")
        print(f"wrote {path}")
        return 0

    if args.split:
        cfg.eval.split = args.split
    data_dir = args.data_dir or cfg.paths.data_dir
    split = cfg.eval.split
    all_samples = load_scoring_samples(data_dir, split)
    samples = all_samples[: cfg.eval.limit] if cfg.eval.limit else all_samples
    run: dict[str, Any] = {}
    if args.predictions:
        wanted = {s["id"] for s in samples}
        # Validated against the whole split: with eval.limit, lines for later samples are skipped, not errors.
        predictions = [p for p in read_predictions(args.predictions, all_samples) if p["id"] in wanted]
        images_per_s = None
        out = args.out or args.predictions.parent
        run["predictions"] = str(args.predictions)
    else:
        from pcbvlm.generate import resolve_model_ref

        model_path = resolve_model_ref(cfg, args.model)
        print(f"evaluating {model_path}", flush=True)
        out = args.out or cfg.paths.outputs_dir / "eval" / f"{Path(model_path).name}-{split}"
        predictions, images_per_s = _generate(cfg, model_path, samples)
        # Kept beside the report, so the run can be rescored later with --predictions.
        atomic_write_jsonl(out / "predictions.jsonl", predictions)
        run["model"] = model_path
    run.update(
        {
            "data": f"{data_dir} ({split}, {len(samples)} of {len(all_samples)} samples)",
            "config": f"{args.config} (digest {cfg.digest()})",
            "evaluated": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    metrics = score_predictions(
        predictions,
        samples,
        out,
        images_per_s=images_per_s,
        worst_n=cfg.eval.worst_n,
        run=run,
        source=str(args.predictions) if args.predictions else "generated predictions",
    )
    write_resolved(cfg, out)
    dp, coco = metrics["deeppcb"], metrics["coco"]
    map50 = "n/a" if coco["map50"] is None else f"{coco['map50']:.4f}"
    print(
        f"DeepPCB P {dp['precision']:.4f} R {dp['recall']:.4f} F {dp['fscore']:.4f} AP {dp['ap']:.4f}; "
        f"COCO mAP@0.5 {map50}; parse failures {metrics['parse_failure_rate']:.2%}"
    )
    print(f"wrote {out}/metrics.json, report.md, pr_curve.png, overlays/")
    return 0


if __name__ == "__main__":
    run_job(main)
