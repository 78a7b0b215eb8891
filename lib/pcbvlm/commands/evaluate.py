"""Evaluate detections on a converted DeepPCB split: DeepPCB protocol, COCO mAP, report with overlays.

    python -m jobs.evaluate --predictions P [--data-dir D] [--split test] [--out DIR]   score a file
    python -m jobs.evaluate [--model PATH|merged|quantized] [--split test] [--out DIR]  run a model
    python -m jobs.evaluate --compare DIR_A DIR_B [--out DIR]                           side by side

Settings come from the config (--config / --set, e.g. --set eval.limit=50); --data-dir and --split
override paths.data_dir and eval.split. The logic lives in pcbvlm.evaluate.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcbvlm.cli import config_from_args, data_folder_line, make_parser, run_job
from pcbvlm.config import Config, write_resolved
from pcbvlm.errors import DataError, UserError
from pcbvlm.evaluate import (
    SPLITS,
    compute_scores,
    load_scoring_samples,
    read_predictions,
    summary_line,
    write_comparison,
    write_scores,
)
from pcbvlm.io import atomic_directory, atomic_write_jsonl, is_partial

# What an evaluation writes into its folder; the folder is replaced as a whole, so one holding anything
# else (a predictions file's own folder, say) is refused rather than emptied.
EVAL_OUTPUTS = frozenset(
    {"metrics.json", "report.md", "pr_curve.png", "overlays", "predictions.jsonl", "config.resolved.yaml"}
)


def check_out(out: Path, keep: Path | None = None) -> None:
    """Refuse an --out that is a file, a `.partial-*` name, or a folder with files an evaluation does not
    write (`keep`: the predictions file being scored, which is carried over)."""
    if is_partial(out):
        raise DataError(f"--out {out}: `.partial-*` names are reserved for unfinished folders")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in EVAL_OUTPUTS and p != keep)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise DataError(
                f"--out {out}: holds {foreign[0]}{more}, which an evaluation does not write; an evaluation "
                "replaces its folder as a whole, so give a new or empty folder (--out, make eval OUT=...)"
            )


def _generate(
    cfg: Config, model_path: str, samples: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    from pcbvlm.generate import generate_predictions

    predictions, images_per_s = generate_predictions(
        cfg, model_path, samples, cfg.eval.batch_size, cfg.eval.max_new_tokens
    )
    return list(predictions), images_per_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("eval", __doc__.splitlines()[0])
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
    print(data_folder_line(cfg, f"scores the {split} split of", data_dir), flush=True)
    all_samples = load_scoring_samples(data_dir, split)
    samples = all_samples[: cfg.eval.limit] if cfg.eval.limit else all_samples
    run: dict[str, Any] = {}
    generated: list[dict[str, Any]] | None = None
    carried: Path | None = None  # the predictions file scored in place, copied into the new folder
    if args.predictions:
        wanted = {s["id"] for s in samples}
        # Validated against the whole split: with eval.limit, lines for later samples are skipped, not errors.
        predictions = [p for p in read_predictions(args.predictions, all_samples) if p["id"] in wanted]
        images_per_s = None
        out = args.out or args.predictions.parent
        if args.predictions.resolve().parent == out.resolve():
            carried = args.predictions
        check_out(out, carried)
        run["predictions"] = str(args.predictions)
    else:
        from pcbvlm.generate import resolve_model_ref

        model_path = resolve_model_ref(cfg, args.model)
        out = args.out or cfg.paths.outputs_dir / "eval" / f"{Path(model_path).name}-{split}"
        check_out(out)  # before the (long) generation
        print(f"evaluating {model_path}", flush=True)
        predictions, images_per_s = _generate(cfg, model_path, samples)
        generated = predictions
        run["model"] = model_path
    run.update(
        {
            "data": f"{data_dir} ({split}, {len(samples)} of {len(all_samples)} samples)",
            "config": f"{args.config} (digest {cfg.digest()})",
            "evaluated": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    scores = compute_scores(
        predictions,
        samples,
        images_per_s=images_per_s,
        run=run,
        source=str(args.predictions) if args.predictions else "generated predictions",
    )
    # The result first: a failing picture or a full disk below must not take the numbers with it.
    print(summary_line(scores.metrics), flush=True)
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            if generated is not None:
                # Kept beside the report, so the run can be rescored later with --predictions.
                atomic_write_jsonl(tmp / "predictions.jsonl", generated)
            if carried is not None:
                shutil.copy2(carried, tmp / carried.name)
            write_scores(tmp, scores, cfg.eval.worst_n)
            write_resolved(cfg, tmp)
    except Exception as err:
        kept = ""
        if generated is not None:
            # Generation is the expensive part (an hour for the 32B model): keep it for --predictions.
            path = atomic_write_jsonl(out.with_name(f"{out.name}.unscored-predictions.jsonl"), generated)
            kept = f"; the generated predictions are kept in {path} (rescore them with --predictions)"
        if isinstance(err, OSError):
            raise UserError(
                f"{out}: could not write the report ({err}); nothing was published there, the metrics "
                f"are above{kept}"
            ) from None
        if kept:
            print(kept.removeprefix("; "), file=sys.stderr)
        raise
    print(f"wrote {out}/metrics.json, report.md, pr_curve.png, overlays/")
    return 0


if __name__ == "__main__":
    run_job(main)
