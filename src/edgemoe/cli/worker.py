"""``edgemoe worker``: run edge servers for a ``dist`` training router on another machine.

    edgemoe worker --connect 10.0.0.5:29500 --servers 4-7

Starts one process per listed server; each connects to the router, reconnects on its own when the
connection drops, and is restarted (with backoff) if it dies. Exits once the router has stopped
every server, or on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run edge servers for a dist training router on another machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--connect", required=True, help="the router's HOST:PORT (its --listen address)")
    p.add_argument("--servers", required=True, help="which servers this machine runs, e.g. 4-7 or 1,3")
    p.add_argument(
        "--give-up-s", type=float, default=600.0, help="stop when the router stays unreachable this long"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgemoe.config import require
    from edgemoe.train.worker import parse_address, parse_servers, run_launcher

    address = parse_address(args.connect, "--connect")
    servers = parse_servers(args.servers, "--servers")
    require(args.give_up_s > 0, "--give-up-s", f"must be > 0, got {args.give_up_s}")
    return run_launcher(address, servers, args.give_up_s)
