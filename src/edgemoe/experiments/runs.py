"""Run folders: the one place that names a run's results folder and writes into it.

A run folder holds ``summary.json``, CSV traces and PNG plots (and whatever else a run records).
:class:`RunFolder` only names the folder; it is created by the first write, so a run that fails
while validating its inputs leaves nothing behind. Every write is atomic (:mod:`edgemoe.files`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgemoe.files import Figure, save_figure, write_csv, write_json, write_text


def run_path(out: str | Path | None, default_root: str | Path, name: str) -> Path:
    """``out`` if given, else ``<default_root>/<name>-<YYYYmmdd-HHMMSS>`` (not created)."""
    if out:
        return Path(out)
    return Path(default_root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunFolder:
    """A run's results folder; files are written atomically and the folder appears with the first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def new(cls, out: str | Path | None, default_root: str | Path, name: str) -> RunFolder:
        """The folder ``out``, or a fresh timestamped one under ``default_root`` (see :func:`run_path`)."""
        return cls(run_path(out, default_root, name))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def create(self) -> Path:
        """Create the folder now (for writers outside this class, e.g. checkpoints)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def json(self, name: str, data: Any) -> Path:
        return write_json(self.path / name, data)

    def text(self, name: str, text: str) -> Path:
        return write_text(self.path / name, text)

    def csv(
        self,
        name: str,
        rows: Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]],
        header: Sequence[str] | None = None,
    ) -> Path:
        return write_csv(self.path / name, rows, header)

    def figure(self, name: str, fig: Figure, *, dpi: int = 110) -> Path:
        return save_figure(fig, self.path / name, dpi=dpi)
