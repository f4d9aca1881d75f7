"""``edgemoe simulate``: run Stable-MoE and the baselines on a simulated edge network.

    edgemoe simulate --scenario paper --slots 5000 --policies all --seeds 3 --out runs/sim
    edgemoe simulate --scenario paper --sweep V=0.1,1,10,100,1000

Writes ``summary.json``, ``spec.yaml``, CSV traces and PNG plots to the run folder and prints a
comparison table. Every flag, policy and sweep value is checked before the folder is created.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgemoe.cli.common import RunFolder, add_config_args, load_config_dict
from edgemoe.edge.spec import SCENARIOS, NetworkSpec, load_scenario, load_spec, merge_dicts, spec_from_dict
from edgemoe.experiments.simulate import DEFAULT_CHUNK, DEFAULT_MEMORY_MB, plan_simulation, run_simulation


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate Stable-MoE and baselines on an edge network",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenario", default="paper", help=f"named scenario: {', '.join(SCENARIOS)}")
    p.add_argument("--spec", type=Path, default=None, help="network spec YAML (instead of --scenario)")
    add_config_args(p)
    p.add_argument("--slots", type=int, default=5000)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument(
        "--policies",
        default=None,
        help="'all' or comma-separated controller names (default: all; with --sweep: stable-moe)",
    )
    p.add_argument("--sweep", default=None, metavar="PARAM=v1,v2,...", help="sweep a controller parameter")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/simulate-<time>)")
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help=f"slots generated per workload chunk (default: up to {DEFAULT_CHUNK} within --memory-mb)",
    )
    p.add_argument(
        "--memory-mb",
        type=float,
        default=DEFAULT_MEMORY_MB,
        help="budget of one chunk's gate scores, chunk x tokens/slot x servers x 8 bytes "
        "(the process peaks at about 2.5x this with its working copies)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="worker processes, one seed each (results do not depend on it)"
    )
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def build_spec(args: argparse.Namespace) -> NetworkSpec:
    overrides = load_config_dict(args)
    if args.spec is None:
        return load_scenario(args.scenario, overrides)
    spec = load_spec(args.spec)
    return spec_from_dict(merge_dicts(spec.to_dict(), overrides)) if overrides else spec


def run(args: argparse.Namespace) -> int:
    from edgemoe.report.network import format_table

    spec = build_spec(args)
    plan = plan_simulation(
        spec,
        slots=args.slots,
        seeds=args.seeds,
        policies=args.policies,
        sweep=args.sweep,
        chunk=args.chunk,
        jobs=args.jobs,
        memory_mb=args.memory_mb,
    )
    for note in plan.notes:
        print(f"edgemoe simulate: warning: {note}", file=sys.stderr)
    folder = RunFolder.new(args.out, "runs", f"simulate-{spec.name}")
    summary = run_simulation(plan, folder, plots=not args.no_plots)
    print(format_table(summary))
    print(f"run folder: {folder}  ({summary['run']['wall_seconds']:.1f} s)")
    return 0
