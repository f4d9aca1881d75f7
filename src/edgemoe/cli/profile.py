"""``edgemoe profile``: measure each edge server's per-token expert cost to set C_j.

    edgemoe profile                                  # in-process, the model of the default config
    edgemoe profile --transport dist --workers 8     # every server process measures itself
    edgemoe profile --config run.yaml --tokens 256 --repeats 20

Each server times its expert's serve forward and backward recompute on ``--tokens`` random tokens
(median of ``--repeats``). Cycles per token at the server's f_max are C_j = seconds/token x f_max:
the value that makes the emulated frequency match this machine. Writes ``profile.json`` and
``servers.yaml`` (``network.servers`` with these C_j) to the run folder, usable as printed:
``edgemoe train --config runs/profile-.../servers.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgemoe.cli.common import add_config_args, load_config_dict, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure each server's per-token expert cost (sets cycles_per_token)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--scenario", help="edge network scenario (paper, homogeneous, bursty, large)")
    p.add_argument("--transport", help="inproc (default) or dist")
    p.add_argument("--workers", type=int, help="dist: number of server processes (= number of servers)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per timed batch")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--out", type=Path, help="run folder (default runs/profile-<time>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from edgemoe.config import require
    from edgemoe.files import atomic_write_bytes
    from edgemoe.runs import RunFolder, check_out_dir
    from edgemoe.train.config import config_with_flags
    from edgemoe.train.lifecycle import default_out
    from edgemoe.train.trainer import make_transport

    require(args.tokens >= 1, "--tokens", f"must be >= 1, got {args.tokens}")
    require(args.repeats >= 1, "--repeats", f"must be >= 1, got {args.repeats}")
    out = check_out_dir(args.out or default_out("runs", "profile"))
    torch.set_num_threads(args.threads)
    cfg = config_with_flags(load_config_dict(args), vars(args))
    spec = cfg.network_spec()
    transport = make_transport(cfg, spec.num_servers)
    try:
        results = transport.profile(args.tokens, args.repeats)
    finally:
        transport.close()
    rows, servers = [], []
    for j in range(spec.num_servers):
        r = results[j] or {}
        cycles = r.get("s_per_token", float("nan")) * spec.f_max_E[j]
        rows.append({"server": j, **r, "f_max_ghz": spec.f_max_E[j] / 1e9, "cycles_per_token": cycles})
        servers.append(
            {
                "f_max": float(spec.f_max_E[j]),
                "cycles_per_token": float(cycles),
                "kappa": float(spec.kappa_E[j]),
                "energy_budget": float(spec.budget_E[j]),
            }
        )
    with RunFolder(out) as folder:
        folder.create()
        write_json(
            out / "profile.json", {"transport": cfg.transport.kind, "tokens": args.tokens, "servers": rows}
        )
        text = yaml.safe_dump({"scenario": cfg.scenario, "network": {"servers": servers}}, sort_keys=False)
        atomic_write_bytes(out / "servers.yaml", text.encode())
    print(
        f"{'server':>6}  {'us/token fwd':>12}  {'us/token bwd':>12}  {'f_max GHz':>9}  {'C_j (cycles/token)':>18}"
    )
    for r in rows:
        print(
            f"{r['server']:>6}  {1e6 * r.get('forward_s_per_token', float('nan')):>12.2f}  "
            f"{1e6 * r.get('backward_s_per_token', float('nan')):>12.2f}  {r['f_max_ghz']:>9.2f}  "
            f"{r['cycles_per_token']:>18.3g}"
        )
    print(f"wrote {out}/profile.json and servers.yaml")
    return 0
