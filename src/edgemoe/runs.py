"""Run folders: the one place that names a run's results folder, checks it and writes into it.

A run folder holds ``summary.json``, CSV traces and PNG plots (and whatever else a run records).

- :func:`default_run_path` names a fresh folder ``<root>/<name>-<YYYYmmdd-HHMMSS>``, with a ``-2``,
  ``-3``, ... suffix when a run started in the same second already took the name.
- :func:`check_out_dir` refuses a ``--out`` that is a file, sits under a file, cannot be written, or
  already holds a previous run (unless the command continues that run, e.g. ``train --resume``), so
  old traces and plots never end up beside a new ``summary.json``.
- :class:`RunFolder` creates the folder with its first file (or :meth:`RunFolder.create`); used as a
  context manager it removes the folder again if the run fails before writing anything. Every write
  is atomic (:mod:`edgemoe.files`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.files import Figure, save_figure, write_csv, write_json, write_text


def default_run_path(root: str | Path, name: str) -> Path:
    """``<root>/<name>-<YYYYmmdd-HHMMSS>``, suffixed ``-2``, ``-3``, ... if that name exists (not created)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def holds_run(path: Path) -> bool:
    """True if ``path`` is a folder with any visible entry (hidden files such as stale temps don't count)."""
    return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())


def check_out_dir(path: str | Path, field: str = "--out", *, resuming: bool = False) -> Path:
    """Refuse a run folder that cannot be created or written, or that holds a previous run unless
    ``resuming`` into it, with a one-line fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, f"{str(path)!r} is a file, not a folder; pass a folder path")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ConfigError(field, f"{str(ancestor)!r} is a file, so {str(path)!r} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(field, f"{str(ancestor)!r} is not writable; choose another run folder")
    if not resuming and holds_run(path):
        raise ConfigError(
            field, f"{str(path)!r} already holds a previous run; choose another folder or delete it"
        )
    return path


def run_path(
    out: str | Path | None,
    default_root: str | Path,
    name: str,
    *,
    field: str = "--out",
    resuming: bool = False,
) -> Path:
    """``out`` if given (checked by :func:`check_out_dir`), else a fresh :func:`default_run_path`."""
    if out:
        return check_out_dir(out, field, resuming=resuming)
    return default_run_path(default_root, name)


class RunFolder:
    """A run's results folder; files are written atomically and the folder appears with the first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False

    @classmethod
    def new(cls, out: str | Path | None, default_root: str | Path, name: str) -> RunFolder:
        """The (checked) folder ``out``, or a fresh one under ``default_root`` (see :func:`run_path`)."""
        return cls(run_path(out, default_root, name))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def create(self) -> Path:
        """Create the folder now (for writers outside this class, e.g. checkpoints)."""
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created = True
        return self.path

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None and self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

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
