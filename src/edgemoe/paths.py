"""Where datasets live: one documented setting for every loader.

The data root is, in order: an explicit ``--data-dir`` (passed as ``override``), the ``EDGEMOE_DATA``
environment variable, then the per-user default ``$XDG_DATA_HOME/edgemoe`` (``~/.local/share/edgemoe``).
Each dataset is a sub-folder of the root (``cifar10/``, ``qa/mmlu/``, ``routing/...``); a loader that
does not find its files raises :class:`~edgemoe.errors.DataError` saying where they go and how to get
them. The product never assumes any folder beside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgemoe.errors import DataError

DATA_ENV = "EDGEMOE_DATA"


def data_root(override: str | Path | None = None) -> Path:
    """The data root: ``override``, else ``$EDGEMOE_DATA``, else the per-user default."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "edgemoe"


def dataset_dir(subdir: str, override: str | Path | None = None) -> Path:
    """``<data root>/<subdir>``, whether or not it exists (loaders check their own files)."""
    return data_root(override) / subdir


def require_path(path: Path, what: str, how: str) -> Path:
    """``path`` if it exists, else a :class:`DataError` naming it, what belongs there and ``how`` to get it."""
    if not path.exists():
        raise DataError(
            str(path),
            f"{what} not found; put it there (or pass --data-dir / set {DATA_ENV} to the folder that "
            f"holds it). {how}",
        )
    return path
