"""Helpers shared by subcommands: config loading with overrides, run folders."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgemoe.config import apply_overrides, load_yaml
from edgemoe.files import write_json

__all__ = ["add_config_args", "load_config_dict", "run_dir", "write_json"]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus repeated ``--set key.sub=value`` overrides."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )


def load_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    return apply_overrides(data, getattr(args, "overrides", []))


def run_dir(out: str | Path | None, default_root: str, name: str) -> Path:
    """A results folder for one run: ``out`` if given, else ``runs/<name>-<timestamp>``."""
    path = Path(out) if out else Path(default_root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path
