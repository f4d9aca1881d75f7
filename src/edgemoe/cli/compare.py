"""``edgemoe compare``: Stable-MoE training against the baseline policies over paired seeds.

    edgemoe compare --dataset fashion-mnist --test-subset 2000 --seeds 0,1,2 --slots 200 --out runs/fm

Every policy trains the same model on the same arrivals and samples per seed; prints the comparison,
diagnostics and paired-difference tables and writes ``summary.json`` (per policy: means, per-seed
runs, paired differences with 95 % intervals), ``comparison.csv``, per-slot traces and PNG plots.
See :mod:`edgemoe.experiments.compare`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from edgemoe.experiments import compare

    p = subparsers.add_parser(
        "compare",
        help="Stable-MoE vs baseline policies over paired seeds (training)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgemoe.experiments import compare

    return compare.run(args)
