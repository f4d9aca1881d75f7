"""Plots for MoE²: accuracy against energy and latency budgets, optimality gap, DMO vs exhaustive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgemoe.files import save_figure  # noqa: E402

STYLE: dict[str, dict[str, Any]] = {
    "dmo": dict(color="C3", marker="o", lw=2.2, label="MoE² (DMO)"),
    "exhaustive": dict(color="k", marker="x", ls="none", ms=8, label="exhaustive"),
    "best_single": dict(color="C0", marker="s", label="best single"),
    "uniform": dict(color="C1", marker="^", label="all feasible, uniform"),
    "greedy": dict(color="C2", marker="v", label="greedy acc/J"),
    "random": dict(color="C7", marker=".", label="random feasible"),
}


def _series(rows: list[dict], sweep: str, x_key: str, y_key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r.get("sweep") != sweep:
            continue
        xs, ys = out.setdefault(r["method"], ([], []))
        xs.append(r[x_key])
        ys.append(r[y_key] if r["feasible"] else float("nan"))
    return out


def plot_sweep(rows: list[dict], folder: str | Path) -> list[Path]:
    """``accuracy_vs_energy.png`` and ``accuracy_vs_latency.png`` (selection and held-out test)."""
    folder = Path(folder)
    paths = []
    for sweep, x_key, xlabel in (
        ("energy", "energy_budget_j", "energy budget per request (J)"),
        ("latency", "latency_budget_s", "latency budget per request (s)"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, y_key, title in zip(
            axes, ("select_accuracy", "test_accuracy"), ("selection split", "held-out test split")
        ):
            for method, (xs, ys) in _series(rows, sweep, x_key, y_key).items():
                ax.plot(xs, ys, **STYLE.get(method, {"label": method}))
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (expected, on correctness-only data)")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"accuracy_vs_{sweep}.png"
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_gap(gap: dict, folder: str | Path) -> Path:
    """Restricted full-set gate vs retrained gate, cross-entropy per subset."""
    rows = gap["rows"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sizes = [r["size"] for r in rows]
    sc = ax.scatter(
        [r["ce_retrained"] for r in rows], [r["ce_restricted"] for r in rows], c=sizes, cmap="viridis", s=14
    )
    lo = min(min(r["ce_retrained"], r["ce_restricted"]) for r in rows)
    hi = max(max(r["ce_retrained"], r["ce_restricted"]) for r in rows)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("cross-entropy, gate retrained on S")
    ax.set_ylabel("cross-entropy, full-set gate restricted to S")
    fig.colorbar(sc, label="|S|")
    fig.tight_layout()
    path = Path(folder) / "optimality_gap.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_dmo(results: list[dict], path: str | Path) -> Path:
    """Evaluations and seconds of DMO and exhaustive search against N (log scale)."""
    ns = [r["n"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("evals", "seconds"), ("objective evaluations", "seconds")):
        ax.semilogy(ns, [r[f"exhaustive_{key}"] for r in results], "k-x", label="exhaustive")
        ax.semilogy(ns, [r[f"dmo_{key}"] for r in results], "C3-o", label="DMO")
        ax.set_xlabel("experts N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_stream(without_j, with_j, budget_j: float, folder: str | Path) -> Path:
    """Running mean energy per request over a served stream, without and with the energy queue."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(1, len(without_j) + 1), without_j, color="C0", label="without queue")
    ax.plot(range(1, len(with_j) + 1), with_j, color="C3", label="with energy queue")
    ax.axhline(budget_j, color="k", ls="--", lw=1, label="budget")
    ax.set_xlabel("request")
    ax.set_ylabel("running mean energy per request (J)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(folder) / "energy_stream.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
