"""``edgemoe simulate``: run Stable-MoE and the baselines on a simulated edge network.

    edgemoe simulate --scenario paper --slots 5000 --policies all --seeds 3 --out runs/sim
    edgemoe simulate --scenario paper --sweep V=0.1,1,10,100,1000

Writes ``summary.json``, ``spec.yaml``, CSV traces and PNG plots to the run folder and prints a
comparison table.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import queue as queue_module
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from edgemoe.cli.common import add_config_args, load_config_dict, run_dir, write_json
from edgemoe.config import ConfigError, require
from edgemoe.edge.controllers import GATE_FOLLOWING, expand_policies
from edgemoe.edge.simulator import PolicySpec, RunTrace, simulate, summarize
from edgemoe.edge.spec import (
    SCENARIOS,
    ControllerSpec,
    NetworkSpec,
    load_scenario,
    load_spec,
    merge_dicts,
    spec_from_dict,
)

HEADLINE_KEYS = (
    "stable_moe_policy",
    "stable_moe_throughput_ratio",
    "best_gate_following_baseline",
    "stable_moe_gc_gain",
    "best_load_only_baseline",
)


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
    p.add_argument("--chunk", type=int, default=250, help="slots generated per workload chunk")
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


def parse_sweep(text: str) -> tuple[str, list[float]]:
    require("=" in text, "--sweep", f"must look like V=0.1,1,10, got {text!r}")
    param, raw = text.split("=", 1)
    param = param.strip()
    allowed = [f for f in ControllerSpec.__dataclass_fields__ if f not in ("mode",)]
    require(param in allowed, "--sweep", f"parameter must be one of {allowed}, got {param!r}")
    try:
        values = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("--sweep", f"values must be numbers, got {raw!r}") from None
    require(len(values) > 0, "--sweep", "give at least one value")
    return param, values


def build_policies(args: argparse.Namespace) -> tuple[list[PolicySpec], dict[str, Any] | None]:
    if args.sweep is None:
        names = expand_policies(args.policies or "all")
        return [PolicySpec(n, n) for n in names], None
    param, values = parse_sweep(args.sweep)
    names = expand_policies(args.policies or "stable-moe")
    policies = []
    for name in names:
        for v in values:
            value: Any = int(v) if param == "block" else v
            policies.append(PolicySpec(f"{name}[{param}={v:g}]", name, {param: value}))
    # References for the sweep plots: the gate-following limit and the load-only limit.
    policies += [PolicySpec(n, n) for n in ("topk-sustainable", "jsq-k") if n not in names]
    return policies, {"param": param, "values": values, "policy": names[0]}


def write_traces(runs: dict[str, RunTrace], folder: Path, seed: int) -> None:
    """One CSV per policy: per-slot totals, then per-server backlog and frequency columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for label, r in runs.items():
        J = r["backlog"].shape[1]
        cols = {
            "slot": np.arange(len(r["tokens"])),
            "tokens": r["tokens"],
            "served": r["served"].sum(axis=1),
            "completed": r["completed"],
            "backlog": r["backlog"].sum(axis=1),
            "energy": r["energy"].sum(axis=1),
            "energy_queue": r["energy_queue"].sum(axis=1),
            "gate_mass": r["gate_mass"],
            "topk_mass": r["topk_mass"],
            "drops": r["drops"],
        }
        cols.update({f"backlog_{j}": r["backlog"][:, j] for j in range(J)})
        cols.update({f"freq_ghz_{j}": r["freq"][:, j] / 1e9 for j in range(J)})
        safe = label.replace("[", "_").replace("]", "").replace("=", "")
        with (folder / f"{safe}_seed{seed}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            w.writerows(zip(*[np.round(c, 6).tolist() for c in cols.values()]))


def print_table(summary: dict[str, Any]) -> None:
    entries = {k: v for k, v in summary.items() if isinstance(v, dict) and "throughput_mean" in v}
    gate = [v["throughput_mean"] for v in entries.values() if v["controller"] in (*GATE_FOLLOWING, "topk")]
    best_gate = max(gate) if gate else None
    header = f"{'policy':28s} {'thr/slot':>9s} {'x best top-K':>12s} {'done/slot':>9s} {'backlog':>10s} {'slope':>8s} {'E/budget':>8s} {'GC':>6s} stable"
    print(header)
    print("-" * len(header))
    for label, v in entries.items():
        ratio = f"{v['throughput_mean'] / best_gate:12.2f}" if best_gate else f"{'-':>12s}"
        print(
            f"{label:28s} {v['throughput_mean']:9.1f} {ratio} {v['completed_mean']:9.1f} "
            f"{v['backlog_mean']:10.0f} {v['backlog_slope_last_half']:8.2f} "
            f"{v['energy_over_budget_max']:8.3f} {v['gc_norm_mean']:6.3f} {'yes' if v['stable'] else 'NO'}"
        )
    for key in ("stable_moe_throughput_ratio", "stable_moe_gc_gain"):
        if key in summary:
            base = summary.get(
                "best_gate_following_baseline" if "ratio" in key else "best_load_only_baseline"
            )
            print(f"{key}: {summary[key]:.3f} ({summary['stable_moe_policy']} vs {base})")


def sweep_points(
    summary: dict[str, Any], policies: list[PolicySpec], sweep: dict[str, Any]
) -> dict[str, Any]:
    """The swept policy's metrics per value, plus a least-squares line of backlog against the value."""
    points = []
    for p in policies:
        if p.name == sweep["policy"] and sweep["param"] in p.params:
            point = {"value": float(p.params[sweep["param"]]), "label": p.label, **summary[p.label]}
            if "topk-sustainable" in summary:
                ref = summary["topk-sustainable"]["throughput_mean"]
                point["throughput_ratio_vs_topk"] = point["throughput_mean"] / max(ref, 1e-12)
            if "jsq-k" in summary:
                point["gc_gain_vs_jsq"] = point["gc_norm_mean"] - summary["jsq-k"]["gc_norm_mean"]
            points.append(point)
    xs = np.array([pt["value"] for pt in points])
    ys = np.array([pt["backlog_mean"] for pt in points])
    fit: dict[str, float] = {}
    if len(points) >= 2 and np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
        resid = ys - (slope * xs + intercept)
        r2 = 1.0 - float(resid @ resid) / max(float(((ys - ys.mean()) ** 2).sum()), 1e-12)
        fit = {"backlog_per_unit": float(slope), "intercept": float(intercept), "r2": r2}
    return {**sweep, "points": points, "backlog_linear_fit": fit}


def _simulate_seed(
    spec: NetworkSpec, policies: list[PolicySpec], slots: int, seed: int, chunk: int, queue: Any
) -> dict[str, RunTrace]:
    """One seed in a worker process; progress goes back through ``queue``."""
    return simulate(spec, policies, slots, seed=seed, chunk=chunk, progress=queue.put)


def run_seeds(
    spec: NetworkSpec, policies: list[PolicySpec], args: argparse.Namespace, progress: Callable[[int], None]
) -> list[dict[str, RunTrace]]:
    """Simulate seeds 0..seeds-1, in ``--jobs`` worker processes (seeds are independent; results are
    identical to a serial run)."""
    jobs = min(args.jobs, args.seeds)
    if jobs <= 1:
        return [
            simulate(spec, policies, args.slots, seed=s, chunk=args.chunk, progress=progress)
            for s in range(args.seeds)
        ]
    with mp.Manager() as manager, ProcessPoolExecutor(max_workers=jobs) as pool:
        queue = manager.Queue()
        futures = [
            pool.submit(_simulate_seed, spec, policies, args.slots, s, args.chunk, queue)
            for s in range(args.seeds)
        ]
        while not all(f.done() for f in futures):
            try:
                progress(queue.get(timeout=0.2))
            except queue_module.Empty:
                continue
        while not queue.empty():
            progress(queue.get())
        return [f.result() for f in futures]


def run(args: argparse.Namespace) -> int:
    require(args.slots >= 1, "--slots", f"must be >= 1, got {args.slots}")
    require(args.seeds >= 1, "--seeds", f"must be >= 1, got {args.seeds}")
    require(args.chunk >= 1, "--chunk", f"must be >= 1, got {args.chunk}")
    require(args.jobs >= 1, "--jobs", f"must be >= 1, got {args.jobs}")
    spec = build_spec(args)
    policies, sweep = build_policies(args)
    out = run_dir(args.out, "runs", f"simulate-{spec.name}")
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))

    total = args.slots * len(policies) * args.seeds
    started = time.perf_counter()
    with tqdm(total=total, desc=f"simulate {spec.name}", unit="slot", mininterval=1.0) as bar:
        runs_by_seed = run_seeds(spec, policies, args, bar.update)
    for seed, runs in enumerate(runs_by_seed):
        write_traces(runs, out / "traces", seed)
    elapsed = time.perf_counter() - started

    summary = summarize(runs_by_seed, spec, policies)
    summary["run"] = {
        "scenario": spec.name,
        "slots": args.slots,
        "seeds": args.seeds,
        "policies": [p.label for p in policies],
        "wall_seconds": elapsed,
        "policy_slots_per_second": total / max(elapsed, 1e-9),
    }
    if sweep is not None:
        # The Stable-MoE-vs-baselines headline is per sweep point here (in sweep.points), not global.
        for key in HEADLINE_KEYS:
            summary.pop(key, None)
        summary["sweep"] = sweep_points(summary, policies, sweep)
    write_json(out / "summary.json", summary)
    if not args.no_plots:
        from edgemoe.report.simulate import plot_runs, plot_sweep

        plot_runs(runs_by_seed[0], spec, summary, out)
        if sweep is not None:
            plot_sweep(summary["sweep"], summary, out)
    print_table(summary)
    if sweep is not None and summary["sweep"]["backlog_linear_fit"]:
        fit = summary["sweep"]["backlog_linear_fit"]
        print(f"backlog vs {sweep['param']}: {fit['backlog_per_unit']:.2f} per unit, R^2 = {fit['r2']:.3f}")
    print(f"run folder: {out}  ({elapsed:.1f} s)")
    return 0
