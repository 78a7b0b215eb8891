"""Dataset importers: each reads one labelled-image layout into the neutral samples (`pcbvlm.samples`).

`make data FORMAT=<name> SRC=<folder>` runs `prepare_data`. Adding a format is one new module in this
package that defines `FORMAT = DatasetFormat(name, title, layout, convert)`, where
`convert(src, data_cfg, progress=False)` returns a `Conversion` (use `common.finish`), plus one line in
`FORMATS` below. Validation helpers (`check_image`, `check_box`), the split rules and the writing are in
`pcbvlm.datasets.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcbvlm.config import Config
from pcbvlm.datasets import coco, deeppcb, voc, yolo
from pcbvlm.datasets.common import Conversion, DatasetFormat, console_out, print_summary, write_outputs
from pcbvlm.errors import DataError
from pcbvlm.families import family_for
from pcbvlm.samples import CLASSES_PLACEHOLDER, STATS_FILE, set_answers

FORMATS: dict[str, DatasetFormat] = {
    "deeppcb": deeppcb.FORMAT,
    "coco": coco.FORMAT,
    "yolo": yolo.FORMAT,
    "voc": voc.FORMAT,
}


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise DataError(f"FORMAT={name}: unknown dataset format (expected one of {', '.join(FORMATS)})")
    return FORMATS[name]


def prepare_data(
    cfg: Config,
    source: str | Path | None = None,
    out_dir: str | Path | None = None,
    strict: bool = False,
    console: Any = None,
    progress: bool = True,
    fmt: str = "deeppcb",
    deeppcb_dir: str | Path | None = None,
) -> Conversion:
    """The `make data` job: convert, print the summary, and write (unless --strict found problems).

    `source` is the dataset folder (`deeppcb_dir` is its older name, for DeepPCB); DeepPCB falls back
    to `cfg.paths.deeppcb_dir`, which is also set to the source so that the resolved config written
    beside the outputs records the paths actually used (stats.json records source and format for every
    format). `out_dir` overrides `cfg.paths.data_dir`.
    """
    dataset = get_format(fmt)
    cfg = cfg.model_copy(deep=True)
    source = source if source is not None else deeppcb_dir
    if source is None and fmt != "deeppcb":
        raise DataError(f"FORMAT={fmt}: give the dataset folder with SRC=... ({dataset.layout})")
    if fmt == "deeppcb" and source is not None:
        cfg.paths.deeppcb_dir = Path(source)
    if out_dir is not None:
        cfg.paths.data_dir = Path(out_dir)
    # Other formats have no config key for their folder: stats.json records source and format.
    conversion = dataset.convert(
        cfg.paths.deeppcb_dir if fmt == "deeppcb" else source, cfg.data, progress=progress
    )
    print_summary(conversion, console)
    _warn_unnamed_classes(conversion, console)
    if strict and conversion.problems:
        first = conversion.problems[0].message
        raise DataError(
            f"--strict: {len(conversion.problems)} problem(s), nothing written to {cfg.paths.data_dir}; first: {first}"
        )
    if not any(conversion.samples.values()):
        raise DataError(
            f"{conversion.source}: no sample could be converted "
            f"({', '.join(f'{len(ids)} {reason}' for reason, ids in conversion.skipped.items()) or 'split files are empty'})"
        )
    # The answers in the configured model family's coordinates (Qwen2.5-VL: resized pixels); training
    # writes them again for the family it trains (pcbvlm.samples.set_answers).
    family = family_for(cfg.model.name_or_path, cfg.model.revision)
    for rows in conversion.samples.values():
        set_answers(rows, cfg.data, family)
    write_outputs(conversion, cfg.paths.data_dir, cfg)
    console_out(console).print(
        f"wrote {cfg.paths.data_dir}/{{train,val,test}}.jsonl and {STATS_FILE}", markup=False
    )
    return conversion


def _warn_unnamed_classes(conversion: Conversion, console: Any) -> None:
    """A prompt without {classes} that does not name the dataset's classes teaches the wrong list."""
    data_cfg = conversion.data_cfg
    prompt = data_cfg.template_prompt if data_cfg.with_template else data_cfg.prompt
    if CLASSES_PLACEHOLDER in prompt:
        return
    unnamed = [name for name in conversion.classes if name not in prompt]
    if unnamed:
        console_out(console).print(
            f"warning: the prompt does not name the classes {', '.join(unnamed)}; put {CLASSES_PLACEHOLDER} "
            "in data.prompt to list the dataset's classes",
            markup=False,
        )
