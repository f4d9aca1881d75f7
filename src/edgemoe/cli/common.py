"""Helpers shared by subcommands: config loading with overrides, the data root flag, flag checks,
run folders (:mod:`edgemoe.runs`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgemoe.config import apply_overrides, load_yaml
from edgemoe.errors import ConfigError
from edgemoe.files import write_json
from edgemoe.paths import DATA_ENV
from edgemoe.runs import RunFolder, run_path

__all__ = [
    "RunFolder",
    "add_config_args",
    "add_data_dir_arg",
    "check_common_flags",
    "load_config_dict",
    "run_dir",
    "write_json",
]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus repeated ``--set key.sub=value`` overrides."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )


def load_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    return apply_overrides(data, getattr(args, "overrides", []))


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: the data root holding every dataset's sub-folder (see :mod:`edgemoe.paths`).

    A string, so it maps straight onto a config's ``data_dir`` field (``None`` when not given).
    """
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"data root with one sub-folder per dataset (default: ${DATA_ENV}, else ~/.local/share/edgemoe)",
    )


def check_common_flags(args: argparse.Namespace) -> None:
    """Flags several subcommands share, checked once for all of them: ``--threads`` >= 1."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ConfigError("--threads", f"must be >= 1 (torch threads), got {threads}")


def run_dir(out: str | Path | None, default_root: str, name: str) -> Path:
    """A results folder for one run, created now: ``out`` if given (it may hold earlier results the
    command continues from), else a fresh ``<default_root>/<name>-<timestamp>``.

    Prefer :class:`~edgemoe.runs.RunFolder`, which creates the folder only with its first file (so a
    run that fails validation leaves no empty folder) and refuses a ``--out`` holding another run.
    """
    path = run_path(out, default_root, name, resuming=True)
    path.mkdir(parents=True, exist_ok=True)
    return path
