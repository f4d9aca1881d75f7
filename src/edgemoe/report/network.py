"""Reports of network simulations (``edgemoe simulate``): the comparison table and PNG plots
(matplotlib, Agg backend) written atomically into the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edgemoe.edge.controllers import GATE_FOLLOWING  # noqa: E402
from edgemoe.edge.simulator import RunTrace  # noqa: E402
from edgemoe.edge.spec import NetworkSpec  # noqa: E402
from edgemoe.files import save_figure  # noqa: E402


def policy_entries(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-policy entries of a simulation summary (label -> metrics)."""
    return {k: v for k, v in summary.items() if isinstance(v, dict) and "throughput_mean" in v}


def format_table(summary: dict[str, Any]) -> str:
    """The comparison table printed after a simulation: one row per policy, then the headline ratios
    (and the backlog-against-parameter fit of a sweep)."""
    entries = policy_entries(summary)
    gate = [v["throughput_mean"] for v in entries.values() if v["controller"] in (*GATE_FOLLOWING, "topk")]
    best_gate = max(gate) if gate else None
    header = (
        f"{'policy':28s} {'thr/slot':>9s} {'x best top-K':>12s} {'done/slot':>9s} {'backlog':>10s} "
        f"{'slope':>8s} {'E/budget':>8s} {'GC':>6s} stable"
    )
    lines = [header, "-" * len(header)]
    for label, v in entries.items():
        ratio = f"{v['throughput_mean'] / best_gate:12.2f}" if best_gate else f"{'-':>12s}"
        lines.append(
            f"{label:28s} {v['throughput_mean']:9.1f} {ratio} {v['completed_mean']:9.1f} "
            f"{v['backlog_mean']:10.0f} {v['backlog_slope_last_half']:8.2f} "
            f"{v['energy_over_budget_max']:8.3f} {v['gc_norm_mean']:6.3f} {'yes' if v['stable'] else 'NO'}"
        )
    for key, base in (
        ("stable_moe_throughput_ratio", "best_gate_following_baseline"),
        ("stable_moe_gc_gain", "best_load_only_baseline"),
    ):
        if key in summary:
            lines.append(f"{key}: {summary[key]:.3f} ({summary['stable_moe_policy']} vs {summary.get(base)})")
    fit = summary.get("sweep", {}).get("backlog_linear_fit")
    if fit:
        lines.append(
            f"backlog vs {summary['sweep']['param']}: {fit['backlog_per_unit']:.2f} per unit, "
            f"R^2 = {fit['r2']:.3f}"
        )
    return "\n".join(lines)


def moving_average(y_T: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(y_T)))
    csum = np.concatenate([[0.0], np.cumsum(y_T, dtype=np.float64)])
    return (csum[window:] - csum[:-window]) / window


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def _per_slot_lines(
    runs: dict[str, RunTrace], out: Path, name: str, ylabel: str, values: dict[str, np.ndarray], log: bool
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, y in values.items():
        ax.plot(np.arange(len(y)), y, label=label, lw=1.2)
    ax.set_xlabel("slot")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("symlog", linthresh=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out / name)


def plot_runs(runs: dict[str, RunTrace], spec: NetworkSpec, summary: dict[str, Any], out: Path) -> list[Path]:
    """Backlog over time, throughput, energy vs budget per server, gating consistency, and the
    throughput/GC plane, for one seed's runs."""
    out = Path(out)
    T = len(next(iter(runs.values()))["tokens"])
    window = max(1, T // 100)
    paths = [
        _per_slot_lines(
            runs,
            out,
            "backlog.png",
            "total token backlog (symlog)",
            {lab: r["backlog"].sum(axis=1) for lab, r in runs.items()},
            log=True,
        ),
        _per_slot_lines(
            runs,
            out,
            "throughput.png",
            f"served token-computations per slot ({window}-slot mean)",
            {lab: moving_average(r["served"].sum(axis=1), window) for lab, r in runs.items()},
            log=False,
        ),
    ]
    gc = {}
    for lab, r in runs.items():
        ratio = np.where(r["topk_mass"] > 0, r["gate_mass"] / np.maximum(r["topk_mass"], 1e-12), 1.0)
        gc[lab] = moving_average(ratio, window)
    paths.append(
        _per_slot_lines(runs, out, "gating_consistency.png", "kept / top-K gate mass", gc, log=False)
    )

    fig, ax = plt.subplots(figsize=(8, 4.5))
    E = spec.num_servers
    width = 0.8 / max(len(runs), 1)
    for i, (lab, r) in enumerate(runs.items()):
        ax.bar(np.arange(E) + i * width, r["energy"].mean(axis=0) / spec.budget_E, width, label=lab)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="budget")
    ax.set_xlabel("server")
    ax.set_ylabel("time-average energy / budget")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / "energy.png"))

    fig, ax = plt.subplots(figsize=(6, 5))
    markers = "osD^vP*X<>"
    for i, (lab, entry) in enumerate(policy_entries(summary).items()):
        ax.scatter(
            entry["gc_norm_mean"], entry["throughput_mean"], s=50, marker=markers[i % len(markers)], label=lab
        )
    ax.set_xlabel("gating consistency (kept / top-K mass)")
    ax.set_ylabel("throughput (served token-computations / slot)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "pareto.png"))
    return paths


def plot_sweep(sweep: dict[str, Any], summary: dict[str, Any], out: Path) -> list[Path]:
    """Utility, gating consistency and mean backlog against the swept parameter (log x axis), with the
    top-K and JSQ-K references as horizontal lines where they were run."""
    out = Path(out)
    param, points = sweep["param"], sweep["points"]
    xs = np.array([p["value"] for p in points], dtype=float)
    paths = []
    for key, ylabel, name in (
        ("utility_mean", "utility per slot (omega1 throughput + omega2 gate mass)", "sweep_utility.png"),
        ("gc_norm_mean", "gating consistency", "sweep_gc.png"),
        ("backlog_mean", "mean total backlog (tokens)", "sweep_backlog.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.plot(xs, [p[key] for p in points], "o-", label=sweep["policy"])
        for ref in ("topk-sustainable", "jsq-k"):
            if ref in summary and key != "backlog_mean":
                ax.axhline(summary[ref][key], ls="--", lw=1, label=ref, color="C1" if "topk" in ref else "C2")
        if np.all(xs > 0):
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / name))
    return paths
