"""``edgemoe demo``: Stable-MoE against top-K, JSQ-K and the strongest load balancers (bias balancing
with uniform and capacity targets, top-K + Switch loss), training on ``digits`` over the ``paper``
network.

    edgemoe demo                      # 40 slots x 3 seeds x 6 policies, under a minute on 2 idle cores
    edgemoe demo --policies all --slots 60 --out runs/demo-all

Prints a comparison table and writes ``runs/demo/summary.json`` (policy -> throughput_mean,
test_accuracy, backlog_mean, energy_over_budget_max, gc_norm_mean, ...), ``comparison.csv``,
per-slot traces and PNG plots. See :mod:`edgemoe.experiments.demo`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from edgemoe.experiments import demo

    p = subparsers.add_parser(
        "demo",
        help="Stable-MoE vs top-K, JSQ-K and load balancers, training on digits (paper network)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgemoe.experiments import demo

    return demo.main(args)
