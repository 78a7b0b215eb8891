"""Atomic file and folder writes: a reader never sees half a file, and an interrupted job leaves none.

Files go to a temporary sibling, are flushed and fsynced, then renamed over the target (rename is atomic
on one filesystem). Folders are built under `<name>.partial-<pid>` and renamed when complete; a
`.partial-*` folder is never mistaken for a finished result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PARTIAL_MARK = ".partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; results should get the usual permissions (readable by the host
        # user when written from a container, by a team on a shared volume).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_figure(figure, path: str | Path, **savefig_kwargs) -> Path:
    """A matplotlib figure as a PNG at `path`, written like `atomic_write_bytes` (no half-drawn picture)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; bad JSON or a non-object names the file and line."""
    from pcbvlm.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:  # JSONDecodeError, or int()'s digit limit on an endless number
                reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(":")[0]
                raise DataError(f"{path} line {number}: invalid JSON ({reason})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_lines(path)]


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    On an exception (or a kill) the temporary folder is what remains, named `<target>.partial-<pid>`,
    and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}{PARTIAL_MARK}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    make_readable(tmp)
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} already exists")
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def make_readable(root: str | Path) -> None:
    """Give files the permissions the umask allows: some writers (safetensors through transformers and
    peft) create 0600 files, which another user of a shared volume or the host user of a container's
    output could not read."""
    mode_files, mode_dirs = 0o666 & ~_umask(), 0o777 & ~_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, mode_dirs)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), mode_files)


def is_partial(path: str | Path) -> bool:
    return PARTIAL_MARK in Path(path).name
