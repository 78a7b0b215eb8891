"""A web page to inspect a board with a model and to browse evaluations (Gradio; pcbvlm.ui).

make ui [MODEL=auto|run|merged|quantized|base|path] [PORT=7860] [HOST=127.0.0.1] [EVALS=dir]
"""

from __future__ import annotations

from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.ui import DEFAULT_HOST, DEFAULT_PORT, MAX_IMAGE_PIXELS


def main(argv=None) -> int:
    parser = make_parser("ui", __doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="run/adapter/merged/quantized folder, base, or a shortcut (default: auto)"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for a rented machine's port)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--evals",
        type=Path,
        action="append",
        help="folder holding evaluation folders to browse (repeatable; default: <paths.outputs_dir>/eval)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help=f"largest upload in pixels (default {MAX_IMAGE_PIXELS:,})",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: must be between 1 and 65535")
    cfg = config_from_args(args)

    from pcbvlm.ui import launch

    launch(cfg, args.model, args.host, args.port, args.evals, args.max_image_pixels)
    return 0


if __name__ == "__main__":
    run_job(main)
