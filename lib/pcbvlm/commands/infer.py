"""Find defects on one board image: boxes as JSON on stdout, an overlay PNG on disk.

The JSON is printed before the overlay is written (atomically); a failed write exits 1 after it.

make infer IMAGE=board_test.jpg [TEMPLATE=board_temp.jpg] [OUT=overlay.png] [MODEL=quantized]
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.errors import DataError, UserError


def main(argv=None) -> int:
    parser = make_parser("infer", __doc__.splitlines()[0])
    parser.add_argument("--image", required=True, type=Path, help="the board under test (jpg/png)")
    parser.add_argument(
        "--template", type=Path, help="its defect-free template (used when data.with_template)"
    )
    parser.add_argument("--out", type=Path, help="overlay PNG (default: <image>.pred.png next to the image)")
    parser.add_argument("--model", help="run/adapter/merged/quantized folder or shortcut (default: auto)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    sizes = {}
    for name, path in (("image", args.image), ("template", args.template)):
        if path is None:
            continue
        try:
            with Image.open(path) as img:
                sizes[name] = img.size
        except FileNotFoundError:
            raise DataError(f"{path}: no such image") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from None

    from pcbvlm.generate import generate_batch, load_for_inference, resolve_model_ref, to_prediction
    from pcbvlm.report import draw_overlay, save_png
    from pcbvlm.samples import build_messages, dataset_classes

    width, height = sizes["image"]
    sample = {
        "id": args.image.stem,
        "image": str(args.image),
        "template": str(args.template) if args.template else None,
        # The classes the model was trained on: those of the converted data (prompt and parsing).
        "classes": list(dataset_classes(cfg.paths.data_dir)),
    }
    loaded = load_for_inference(cfg, resolve_model_ref(cfg, args.model))
    messages = build_messages(sample, cfg.data, with_answer=False)
    text, offsets, probs = generate_batch(loaded, [messages], cfg.eval.max_new_tokens)[0]
    frame = loaded.answer_frame(cfg, width, height)  # the model family's coordinates
    prediction = to_prediction(text, offsets, probs, sample["id"], width, height, sample["classes"], frame)
    out = args.out or args.image.with_name(f"{args.image.stem}.pred.png")
    result = {
        "image": str(args.image),
        "model": loaded.path,
        "width": width,
        "height": height,
        "objects": prediction["objects"],
        "error": prediction["error"],
        "raw": text,
        "overlay": str(out),
    }
    # The boxes first: a picture that cannot be written (full disk, bad --out) must not take them along.
    print(json.dumps(result, indent=2), flush=True)
    try:
        save_png(draw_overlay(args.image, prediction["objects"]), out)  # atomic: a temp file, then rename
    except OSError as err:
        raise UserError(f"{out}: could not write the overlay ({err}); the boxes are printed above") from None
    return 0


if __name__ == "__main__":
    run_job(main)
