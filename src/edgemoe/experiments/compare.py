"""Policy comparisons at a fixed slot budget: every policy, every seed, same data and arrivals.

For one seed all policies see the same arrival counts and the same sample stream (common random
numbers), so differences come from routing and frequency control only. Used by ``edgemoe demo``
and by the experiments of docs/results.md::

    edgemoe compare --dataset fashion-mnist --seeds 0,1,2 --slots 100 --out runs/exp-fm

Writes ``summary.json`` (policy -> mean metrics, plus per-seed values, standard deviations and,
for every baseline, ``paired``: Stable-MoE minus the baseline per seed, with a 95 % confidence
interval), ``comparison.csv``, per-run slot/eval traces and ``curves.png`` (seed 0: accuracy,
backlog and throughput against slots) to the output folder. Every run also reports the routing
diagnostics of :meth:`edgemoe.train.trainer.Trainer.diagnostics`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from edgemoe.config import ConfigError, apply_overrides, require
from edgemoe.edge.controllers import expand_policies
from edgemoe.files import write_csv, write_json
from edgemoe.report.train import (
    diagnostics_table,
    format_table,
    markdown_table,
    paired_table,
    plot_comparison,
    plot_servers,
)
from edgemoe.runs import check_out_dir
from edgemoe.train.config import TrainConfig, train_config_from_dict
from edgemoe.train.data import load_dataset
from edgemoe.train.trainer import Trainer, flat_row

METRICS = (
    "throughput_mean",
    "test_accuracy",
    "backlog_mean",
    "energy_over_budget_max",
    "gc_norm_mean",
    "completed_mean",
    "trained",
    "arrived",
    "dropped_assignments",
    "test_accuracy_gate",
)
PAIRED = ("test_accuracy", "test_accuracy_gate", "throughput_mean")


def policy_config(base: dict[str, Any], policy: str, seed: int) -> TrainConfig:
    """``base`` (a TrainConfig mapping) for one policy and seed; ``controller`` applies to Stable-MoE
    only, except ``controller.bias_rate``, which applies to the bias balancers."""
    data = dict(base, policy=policy, seed=seed)
    if not policy.startswith("stable-moe"):
        controller = dict(base.get("controller", {}))
        keep = ("bias_rate",) if policy.startswith("bias-") else ()
        data["controller"] = {k: v for k, v in controller.items() if k in keep}
    return train_config_from_dict(data)


def run_comparison(
    base: dict[str, Any],
    policies: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Train every (policy, seed); write the report to ``out``; return policy -> aggregated summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    probe = policy_config(base, policies[0], seeds[0])
    per_run: dict[str, list[dict[str, float]]] = {p: [] for p in policies}
    curves = {}
    for seed in seeds:
        data = load_dataset(
            probe.data.name,
            probe.data.data_dir,
            train_subset=probe.data.train_subset,
            test_subset=probe.data.test_subset,
            seed=seed,
            label=probe.data.label,
        )
        for policy in policies:
            cfg = policy_config(base, policy, seed)
            trainer = Trainer(cfg, dataset=data)
            start = time.perf_counter()
            desc = f"{policy:>16} seed {seed}"
            with tqdm(total=cfg.slots, desc=desc, unit="slot", disable=not progress, leave=False) as bar:
                trainer.run(on_slot=lambda row, bar=bar: bar.update(1))  # type: ignore[misc]  # default arg
            summary = trainer.summary()
            row = {key: float(summary[key]) for key in METRICS}
            row.update(flat_row(trainer.diagnostics()))
            row["wall_s"] = time.perf_counter() - start
            per_run[policy].append(row)
            write_csv(
                out / "traces" / f"slots_{policy}_seed{seed}.csv", [flat_row(r) for r in trainer.history]
            )
            write_csv(out / "traces" / f"evals_{policy}_seed{seed}.csv", trainer.evals)
            if seed == seeds[0]:
                curves[policy] = (trainer.history, trainer.evals)
                plot_servers(
                    trainer.history, trainer.num_servers, out / f"servers_{policy}.png", title=policy
                )
            trainer.close()
            if progress:
                tqdm.write(
                    f"{policy:>16} seed {seed}: throughput {row['throughput_mean']:.1f}, "
                    f"accuracy {row['test_accuracy']:.3f}, backlog {row['backlog_mean']:.0f}, {row['wall_s']:.0f}s"
                )
    summaries = aggregate(per_run)
    add_paired(summaries)
    write_json(out / "summary.json", summaries)
    write_csv(
        out / "comparison.csv",
        [{"policy": p, "seed": s, **r} for p, runs in per_run.items() for s, r in zip(seeds, runs)],
    )
    write_json(out / "config.json", {"base": base, "policies": list(policies), "seeds": list(seeds)})
    title = (
        f"{probe.data.name}, {probe.scenario} scenario x{probe.scale}, {probe.slots} slots, seed {seeds[0]}"
    )
    plot_comparison(curves, out / "curves.png", title=title)
    return summaries


def aggregate(per_run: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Mean over seeds of every metric, with ``<metric>_std`` and the per-seed list ``seeds``."""
    out: dict[str, dict[str, Any]] = {}
    for policy, runs in per_run.items():
        entry: dict[str, Any] = {}
        for key in runs[0]:
            values = np.array([r[key] for r in runs], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        entry["seeds"] = runs
        out[policy] = entry
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval (nan bounds with fewer than two values)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def add_paired(summaries: dict[str, dict[str, Any]], ours: str = "stable-moe") -> None:
    """Give every baseline a ``paired`` entry: per seed, ``ours`` minus the baseline (accuracy in
    points, throughput as a ratio), with mean and 95 % CI over seeds (seeds are paired: same
    arrivals and samples)."""
    if ours not in summaries:
        return
    mine = summaries[ours]["seeds"]
    for name, entry in summaries.items():
        if name == ours:
            continue
        theirs = entry["seeds"]
        paired: dict[str, Any] = {}
        for key in PAIRED:
            if key == "throughput_mean":
                diffs = [a[key] / max(b[key], 1e-9) for a, b in zip(mine, theirs)]
            else:
                diffs = [100 * (a[key] - b[key]) for a, b in zip(mine, theirs)]
            mean, lo, hi = mean_ci(diffs)
            paired[key] = {"mean": mean, "ci95": [lo, hi], "per_seed": diffs}
        entry["paired"] = paired


def spread(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        p: {k[: -len("_std")]: v for k, v in s.items() if k.endswith("_std")} for p, s in summaries.items()
    }


def claim_lines(summaries: dict[str, dict[str, Any]], ours: str = "stable-moe") -> list[str]:
    """How ``ours`` compares with each baseline: throughput ratio and accuracy difference (points),
    the same paired per-seed means as the paired table (with their 95 % CI when there are several
    seeds), so the two never disagree."""
    if ours not in summaries:
        return []
    lines = []
    mine = summaries[ours]
    for name, other in summaries.items():
        if name == ours:
            continue
        paired = other.get("paired", {})
        ratio = paired.get("throughput_mean", {}).get(
            "mean", mine["throughput_mean"] / max(other["throughput_mean"], 1e-9)
        )
        gain = paired.get("test_accuracy", {}).get(
            "mean", 100 * (mine["test_accuracy"] - other["test_accuracy"])
        )
        line = f"{ours} vs {name}: throughput x{ratio:.2f}, test accuracy {gain:+.1f} points"
        lo, hi = paired.get("test_accuracy", {}).get("ci95", [float("nan")] * 2)
        if np.isfinite(lo):
            line += f" (95% CI {lo:+.1f} to {hi:+.1f})"
        lines.append(line)
    return lines


def parse_seeds(text: str, field: str = "--seeds") -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a clear error naming ``field`` for anything else."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(field, f"must be comma-separated integers like 0,1,2, got {text!r}") from None
    require(len(seeds) > 0, field, "give at least one seed")
    require(len(set(seeds)) == len(seeds), field, f"seeds must differ, got {text!r}")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``edgemoe compare`` flags."""
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None, help="data root (default: $EDGEMOE_DATA)")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument(
        "--policies",
        default="stable-moe,topk,topk-sustainable,topk-capacity,random-k,jsq-k,bias-uniform,bias-capacity,topk-switch",
        help="comma-separated controllers, or 'all'",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (paired across policies)")
    parser.add_argument("--slots", type=int, default=100)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, required=True, help="results folder (must not hold a run)")


def run(args: argparse.Namespace) -> int:
    """Run the comparison the flags describe and print its tables."""
    seeds = parse_seeds(args.seeds)
    policies = expand_policies(args.policies)
    check_out_dir(args.out)
    torch.set_num_threads(args.threads)
    base = {
        "slots": args.slots,
        "scale": args.scale,
        "eval_every": args.eval_every,
        "record_scores": False,
        "data": {
            "name": args.dataset,
            "data_dir": args.data_dir,
            "train_subset": args.train_subset,
            "test_subset": args.test_subset,
        },
    }
    base = apply_overrides(base, args.overrides)
    summaries = run_comparison(base, policies, seeds, args.out)
    print(format_table(summaries, spread(summaries)))
    print()
    print(markdown_table(summaries, spread(summaries)))
    print()
    print(diagnostics_table(summaries))
    print()
    print(paired_table(summaries))
    for line in claim_lines(summaries):
        print(line)
    return 0
