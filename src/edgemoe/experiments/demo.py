"""The Stable-MoE demo: Stable-MoE against gate-following top-K, JSQ-K and the strongest balancers
(auxiliary-loss-free bias balancing with uniform and capacity-proportional targets, top-K + Switch
load-balance loss), training on ``digits`` over the ``paper`` network.

The paper network (8 servers at 1-3 GHz, K=2, energy budgets binding on the fast servers, gate
popularity skewed toward the slow servers in the controller's view) scaled to a quarter of its
token rate, a fixed budget of 40 slots, three seeds, identical arrivals and samples for every
policy within a seed. Prints a comparison table, the routing diagnostics and Stable-MoE's paired
differences, and writes ``summary.json`` (policy -> ``throughput_mean``, ``test_accuracy``,
``backlog_mean``, ``energy_over_budget_max``, ``gc_norm_mean``, diagnostics, ``paired``, ...),
``comparison.csv``, traces and ``curves.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Heavy modules (torch, the trainer, matplotlib) are imported in main() so that building the
# ``edgemoe`` parser stays fast.
DEMO_POLICIES = "stable-moe,topk,jsq-k,bias-uniform,bias-capacity,topk-switch"


def demo_base(slots: int, scale: float) -> dict[str, Any]:
    """The demo's training config (everything but policy and seed)."""
    return {
        "slots": slots,
        "scale": scale,
        "scenario": "paper",
        "eval_every": 5,
        "record_scores": False,
        "data": {"name": "digits"},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``edgemoe demo`` flags."""
    p.add_argument("--slots", type=int, default=40, help="fixed slot budget per policy")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (metrics are averaged)")
    p.add_argument("--scale", type=float, default=0.25, help="scale of the paper network's token rate")
    p.add_argument("--policies", default=DEMO_POLICIES, help="comma-separated controllers, or 'all'")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--threads", type=int, default=1, help="torch threads")


def main(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments and print the table."""
    import torch

    from edgemoe.edge.controllers import expand_policies
    from edgemoe.experiments.compare import claim_lines, parse_seeds, run_comparison, spread
    from edgemoe.report.train import diagnostics_table, format_table, paired_table

    torch.set_num_threads(args.threads)
    policies = expand_policies(args.policies)
    seeds = parse_seeds(args.seeds)
    summaries = run_comparison(demo_base(args.slots, args.scale), policies, seeds, args.out)
    print()
    print(format_table(summaries, spread(summaries) if len(seeds) > 1 else None))
    print()
    print(diagnostics_table(summaries))
    if len(seeds) > 1:
        print()
        print(paired_table(summaries))
    for line in claim_lines(summaries):
        print(line)
    print(f"results: {args.out}/summary.json, comparison.csv, curves.png")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
