"""What a training run needs around the trainer: a validated run folder that is never left empty,
``--resume auto``, and clean stops on SIGINT/SIGTERM.

- :func:`default_out` names the run folder; :func:`~edgemoe.runs.check_out_dir` and
  :class:`~edgemoe.runs.RunFolder` (the one run-folder helper) refuse a bad or
  already used ``--out`` before anything runs, and create the folder only when the run starts.
- :func:`resolve_resume`: ``auto`` resumes from ``<out>/checkpoint.pt`` when it exists (a restarted
  job continues in the same folder) and starts fresh otherwise; it is the default in a job torchrun
  has restarted.
- :class:`StopSignals` turns the first SIGINT/SIGTERM into a request the trainer honours between
  slots; the caller then writes the checkpoint and results and exits ``128 + signal``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.runs import default_run_path

__all__ = [
    "StopSignals",
    "default_out",
    "resolve_resume",
    "restarted",
]


def restarted() -> bool:
    """True in a job that torchrun (``--max-restarts``) has restarted."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def default_out(root: str, name: str) -> Path:
    """``runs/<name>-<time>``; under torchrun ``runs/<name>-<run id>`` so restarts share the folder."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return Path(root) / f"{name}-{run_id}"
    if restarted():
        raise ConfigError(
            "--out", "a restarted torchrun job needs --out (or --rdzv-id) to find its checkpoint"
        )
    return default_run_path(root, name)


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """``None`` -> start fresh (``auto`` in a restarted torchrun job); ``auto`` ->
    ``<out>/checkpoint.pt`` if it exists; else the path."""
    if resume is None:
        if not restarted():
            return None
        resume = "auto"
    if resume == "auto":
        path = out / "checkpoint.pt"
        return path if path.is_file() else None
    return Path(resume)


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`signum`; a second one exits at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum:
            print(f"edgemoe: second {signal.Signals(signum).name}: exiting without saving", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum

    def requested(self) -> bool:
        return bool(self.signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
