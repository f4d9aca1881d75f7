"""Crash-safe file writes shared by every layer: JSON, CSV, text, figures, checkpoints.

A write goes to a temporary file in the target's folder, is flushed and fsynced, then renamed over
the target: a crash leaves the old file or the new one, never a torn one. The writers here are the
only way the package writes results (run folders, traces, plots, summaries).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class Figure(Protocol):
    """What :func:`save_figure` needs of a figure (matplotlib's ``Figure`` has it)."""

    def savefig(self, fname: Any, **kwargs: Any) -> None: ...


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically; numpy scalars become floats."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")


def write_csv(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]],
    header: Sequence[str] | None = None,
) -> Path:
    """Write rows as CSV, atomically.

    ``rows`` are mappings (columns: ``header``, else the first row's keys; missing cells are empty)
    or sequences (``header`` names the columns; without it no header line is written). No rows and
    no header give an empty file.
    """
    buffer = io.StringIO(newline="")
    remaining: Iterator[Any] = iter(rows)
    first = next(remaining, None)
    if isinstance(first, Mapping):
        writer: Any = csv.DictWriter(buffer, fieldnames=list(header or first), lineterminator="\n")
        writer.writeheader()
        writer.writerow(first)
    else:
        writer = csv.writer(buffer, lineterminator="\n")
        if header is not None:
            writer.writerow(header)
        if first is not None:
            writer.writerow(first)
    writer.writerows(remaining)
    return write_text(path, buffer.getvalue())


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Render ``fig`` (format from the file suffix, e.g. ``.png``) and write it atomically.

    The caller closes the figure (``plt.close(fig)``); this layer does not import matplotlib.
    """
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
