"""Printing a preflight report (rich tables) and writing it as JSON."""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pcbvlm.io import atomic_write_json
from pcbvlm.preflight.checks import Report
from pcbvlm.preflight.estimate import Estimate
from pcbvlm.preflight.facts import Facts

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def make_console(file: Any = None) -> Console:
    """A console that keeps tables readable in logs: 120 columns when not writing to a terminal."""
    file = file or sys.stdout
    terminal = hasattr(file, "isatty") and file.isatty()
    return Console(file=file, width=None if terminal else 120, highlight=False)


def estimate_table(estimate: Estimate) -> Table:
    where = "GPU" if estimate.device == "gpu" else "RAM"
    table = Table(title=f"{where} estimate: {estimate.what}", title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for item in estimate.items:
        gib = f"{item.gib:.2f}"
        note = item.note
        if item.kind == "transient":
            note += " (transient" + (", the largest: counted)" if item.counted else ", not counted)")
        table.add_row(item.name, gib if item.counted else f"[dim]({gib})[/dim]", note)
    table.add_section()
    table.add_row("[bold]peak[/bold]", f"[bold]{estimate.total_gib:.1f}[/bold]", "")
    return table


def print_report(report: Report, console: Console, config_path: str = "") -> None:
    for estimate in report.estimates:
        console.print(estimate_table(estimate))
    title = f"preflight JOB={report.job}" + (f" ({config_path})" if config_path else "")
    table = Table(title=title, title_justify="left")
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("detail")
    for check in report.checks:
        table.add_row(check.name, f"[{_STYLE[check.status]}]{check.status}[/]", check.detail)
    console.print(table)
    console.print(f"model shape: {report.shape_source}")
    if report.allow_cpu:
        console.print(
            "CPU allowed (--allow-cpu or resources.allow_cpu): GPU checks are skipped without a GPU"
        )


def failure_lines(report: Report) -> list[str]:
    """One line per failed check: what failed, and what to do."""
    return [
        f"FAILED {c.name}: {c.detail}" + (f" -> fix: {c.remedy}" if c.remedy else "") for c in report.failures
    ]


def write_report(report: Report, facts: Facts, path: Path, config_path: str = "") -> Path:
    payload = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": config_path,
        **report.to_dict(),
        "facts": facts.model_dump(mode="json"),
    }
    return atomic_write_json(path, payload)
