"""Quantize the merged model to 4-bit AWQ (W4A16, compressed-tensors) with llm-compressor and verify it.

    make quantize [MODEL=merged-folder] [CONFIG=...] [SET="quantize.num_calibration_samples=128"]
    pcbvlm quantize [--model DIR] [--out DIR]

Default input: <paths.outputs_dir>/merged; default output: <paths.outputs_dir>/quantized (what
`vllm serve` takes). Exit codes: 0 quantized and verified, 1 refused or verification failed (nothing
written), 2 bad input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pcbvlm.cli import config_from_args, data_folder_line, make_parser, run_job


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("quantize", __doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        help="the merged model folder (default: <paths.outputs_dir>/merged)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <paths.outputs_dir>/quantized)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    print(data_folder_line(cfg, "calibrates on"), flush=True)
    if cfg.quantize.device == "cpu":
        # llm-compressor calibrates on the first visible accelerator, whatever the caller wants: hiding
        # the GPUs (before torch first touches CUDA) is how a CPU run is asked for.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pcbvlm.quantize import print_summary, quantize_model

    result = quantize_model(cfg, model=args.model, out=args.out)
    print_summary(result)
    return 0


if __name__ == "__main__":
    run_job(main)
