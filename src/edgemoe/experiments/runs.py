"""Run folders for experiments: re-exported from :mod:`edgemoe.runs`, the one run-folder helper."""

from __future__ import annotations

from edgemoe.runs import RunFolder, check_out_dir, default_run_path, run_path

__all__ = ["RunFolder", "check_out_dir", "default_run_path", "run_path"]
