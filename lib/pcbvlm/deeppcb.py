"""The old import path of the DeepPCB converter, kept so that code written against it still runs.

The importer is `pcbvlm.datasets.deeppcb`, the sample format `pcbvlm.samples`, the job
`pcbvlm.datasets.prepare_data`; new code imports those.
"""

from __future__ import annotations

from pcbvlm.datasets import prepare_data
from pcbvlm.datasets.common import (
    STATS_FILE,
    Conversion,
    Problem,
    assign_val,
    print_summary,
    write_outputs,
)
from pcbvlm.datasets.deeppcb import SPLIT_FILES, convert, find_pcbdata, parse_annotation, read_split_file
from pcbvlm.samples import OUTPUT_SPLITS, build_messages, load_samples

__all__ = [
    "OUTPUT_SPLITS",
    "SPLIT_FILES",
    "STATS_FILE",
    "Conversion",
    "Problem",
    "assign_val",
    "build_messages",
    "convert",
    "find_pcbdata",
    "load_samples",
    "parse_annotation",
    "prepare_data",
    "print_summary",
    "read_split_file",
    "write_outputs",
]
