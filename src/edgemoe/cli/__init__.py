"""The ``edgemoe`` command.

Every module in this package that defines ``register(subparsers)`` contributes subcommands; a
subcommand sets ``func`` (called with the parsed args, returns an exit code). Errors a user can fix
(any :class:`edgemoe.errors.EdgeMoEError`, missing files) are printed as one clear line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from edgemoe import __version__
from edgemoe.errors import EdgeMoEError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemoe", description="Mixture-of-Experts over heterogeneous edge networks."
    )
    parser.add_argument("--version", action="version", version=f"edgemoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from edgemoe.cli.common import check_common_flags

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        check_common_flags(args)
        return int(args.func(args) or 0)
    except (EdgeMoEError, FileNotFoundError) as exc:
        print(f"edgemoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
