"""Stable-MoE per-slot controller and simulator speed.

One slot's decision for N tokens and J servers (the `large` scenario's network), timed against plain
top-K's decision on the same scores (same interface: validation, top-K routing, frequency rule) and
against the generic reference solver of the same per-slot problem (scipy MILP + scalar search).
Simulator speed in slots per second (all policies in lock-step, common random numbers) for `paper`
and `large`. Writes ``benchmarks/results/controller.json``.

    python benchmarks/controller.py [--tokens 4096] [--repeats 30] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from edgemoe.edge import NetworkState, load_scenario, make_controller
from edgemoe.edge.controllers import ALL_POLICIES, topk_ids
from edgemoe.edge.reference import slot_objective, solve_reference
from edgemoe.edge.scores import SkewedScoreGenerator
from edgemoe.edge.simulator import PolicySpec, simulate

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn, repeats: int) -> float:
    """Minimum wall time over ``repeats`` calls (after one warm-up call): the least noisy estimate on a
    shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decision_benchmark(tokens: int, repeats: int, milp: bool) -> dict:
    spec = load_scenario("large")
    J = spec.num_servers
    rng = np.random.default_rng(0)
    scores_NE = SkewedScoreGenerator(spec.scores, spec.f_max_E).sample(tokens, rng)[0]
    state = NetworkState.initial(spec)
    state.backlog_E = rng.uniform(0, 400, J)
    state.energy_queue_E = rng.uniform(0, 10, J)
    ctrls = {
        "topk (decide)": make_controller("topk", spec),
        "stable-moe linear": make_controller("stable-moe-linear", spec),
        "stable-moe sequential (auto, 16 blocks)": make_controller("stable-moe-sequential", spec),
        "stable-moe sequential (block=64)": make_controller("stable-moe-sequential", spec, block=64),
    }
    out: dict = {"tokens": tokens, "servers": J, "k": spec.k, "seconds": {}}
    out["seconds"]["topk (bare argpartition)"] = best_time(lambda: topk_ids(scores_NE, spec.k), repeats)
    for name, ctrl in ctrls.items():
        out["seconds"][name] = best_time(lambda c=ctrl: c.decide(state, scores_NE), repeats)
    base = out["seconds"]["topk (decide)"]
    out["ratio_to_topk"] = {k: v / base for k, v in out["seconds"].items()}
    if milp:
        cfg = ctrls["stable-moe linear"].cfg
        t0 = time.perf_counter()
        ref = solve_reference(spec, state, cfg, scores_NE)
        milp_s = time.perf_counter() - t0
        mine = ctrls["stable-moe linear"].decide(state, scores_NE)
        a, b = (slot_objective(spec, state, cfg, scores_NE, d) for d in (mine, ref))
        out["reference_seconds"] = milp_s
        out["reference_over_linear"] = milp_s / out["seconds"]["stable-moe linear"]
        out["objective_closed_form"] = a
        out["objective_reference"] = b
        out["objective_relative_gap"] = abs(a - b) / max(abs(b), 1.0)
    return out


def simulator_benchmark(scenario: str, slots: int) -> dict:
    spec = load_scenario(scenario)
    policies = [PolicySpec(n, n) for n in ALL_POLICIES]
    t0 = time.perf_counter()
    simulate(spec, policies, slots, seed=0)
    elapsed = time.perf_counter() - t0
    return {
        "scenario": scenario,
        "slots": slots,
        "policies": len(policies),
        "seconds": elapsed,
        "slots_per_second_all_policies": slots / elapsed,
        "policy_slots_per_second": slots * len(policies) / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="small sizes, no MILP (smoke run)")
    args, _ = parser.parse_known_args()
    tokens = 256 if args.quick else args.tokens
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "numpy": np.__version__,
        },
        "decision": decision_benchmark(tokens, 3 if args.quick else args.repeats, milp=not args.quick),
        "simulator": [
            simulator_benchmark("paper", 100 if args.quick else 1000),
            simulator_benchmark("large", 10 if args.quick else 100),
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "controller.json").write_text(json.dumps(result, indent=2) + "\n")
    d = result["decision"]
    print(f"one slot, N={d['tokens']} J={d['servers']} K={d['k']} (best of {args.repeats}):")
    for name, sec in d["seconds"].items():
        print(f"  {name:42s} {sec * 1e3:9.3f} ms   {d['ratio_to_topk'][name]:6.2f}x topk")
    if "reference_seconds" in d:
        print(
            f"  reference (MILP + scalar search)           {d['reference_seconds'] * 1e3:9.1f} ms   "
            f"linear is {d['reference_over_linear']:.0f}x faster; objective gap {d['objective_relative_gap']:.1e}"
        )
    for s in result["simulator"]:
        print(
            f"simulator {s['scenario']:6s}: {s['slots_per_second_all_policies']:8.1f} slots/s with "
            f"{s['policies']} policies ({s['policy_slots_per_second']:.0f} policy-slots/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
