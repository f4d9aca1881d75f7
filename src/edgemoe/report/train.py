"""Reports of training runs: CSV traces, comparison tables and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TABLE_COLUMNS = (
    ("throughput_mean", "throughput/slot", "{:.1f}"),
    ("completed_mean", "trained/slot", "{:.1f}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("backlog_mean", "backlog", "{:.0f}"),
    ("energy_over_budget_max", "energy/budget", "{:.2f}"),
    ("gc_norm_mean", "gating cons.", "{:.3f}"),
)


def format_table(
    summaries: Mapping[str, Mapping[str, Any]], spread: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """A plain-text comparison table, one row per policy (``± std`` when ``spread`` is given)."""
    header = ["policy"] + [title for _, title, _ in TABLE_COLUMNS]
    lines = [[name, *_cells(name, summary, spread)] for name, summary in summaries.items()]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt_row(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths]), *map(fmt_row, lines)])


def markdown_table(
    summaries: Mapping[str, Mapping[str, Any]], spread: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """The same table as GitHub markdown."""
    header = "| policy | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [f"| {name} | " + " | ".join(_cells(name, s, spread)) + " |" for name, s in summaries.items()]
    return "\n".join([header, rule, *rows])


DIAGNOSTIC_COLUMNS = (
    ("test_accuracy_bias", "acc (bias)", "{:.3f}"),
    ("test_accuracy_gate", "acc (gate top-K)", "{:.3f}"),
    ("test_accuracy_random", "acc (random)", "{:.3f}"),
    ("test_accuracy_zero", "acc (experts 0)", "{:.3f}"),
    ("mi_train_bits", "MI train", "{:.2f}"),
    ("mi_test_bits", "MI test", "{:.2f}"),
    ("gc_norm_mean", "gating cons.", "{:.3f}"),
)


def diagnostics_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the routing diagnostics per policy (means over seeds): test accuracy under
    each test routing, MI(expert; class) in bits, gating consistency and per-server shares."""
    present = [c for c in DIAGNOSTIC_COLUMNS if all(c[0] in s for s in summaries.values())]
    header = "| policy | " + " | ".join(t for _, t, _ in present) + " | server shares |"
    rule = "|---|" + "---:|" * len(present) + "---|"
    rows = []
    for name, s in summaries.items():
        keys = sorted((k for k in s if k.startswith("share_") and k[6:].isdigit()), key=lambda k: int(k[6:]))
        shares = "/".join(f"{100 * s[k]:.0f}" for k in keys)
        rows.append(f"| {name} | " + " | ".join(f.format(s[k]) for k, _, f in present) + f" | {shares} |")
    return "\n".join([header, rule, *rows])


def paired_table(summaries: Mapping[str, Mapping[str, Any]], ours: str = "stable-moe") -> str:
    """Markdown table of ``ours`` minus each baseline, paired by seed: mean [95 % CI]."""
    header = f"| {ours} vs | accuracy (points) | gate top-K accuracy (points) | throughput ratio |"
    rows = [header, "|---|---:|---:|---:|"]
    for name, s in summaries.items():
        paired = s.get("paired")
        if not paired:
            continue
        cells = []
        for key, fmt in (
            ("test_accuracy", "{:+.1f}"),
            ("test_accuracy_gate", "{:+.1f}"),
            ("throughput_mean", "{:.2f}"),
        ):
            mean, (lo, hi) = paired[key]["mean"], paired[key]["ci95"]
            ci = f" [{fmt.format(lo)}, {fmt.format(hi)}]" if np.isfinite(lo) else ""
            cells.append(fmt.format(mean) + ci)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cells(
    name: str, summary: Mapping[str, Any], spread: Mapping[str, Mapping[str, float]] | None
) -> list[str]:
    cells = []
    for key, _, fmt in TABLE_COLUMNS:
        cell = fmt.format(summary[key])
        if spread and key in spread.get(name, {}):
            cell += " ± " + fmt.format(spread[name][key])
        cells.append(cell)
    return cells


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def plot_comparison(
    runs: Mapping[str, tuple[Sequence[Mapping[str, float]], Sequence[Mapping[str, float]]]],
    out: Path,
    title: str = "",
) -> Path:
    """Accuracy, backlog and throughput against slots, one line per policy.

    ``runs`` maps a policy to (per-slot history rows, evaluation rows).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (history, evals) in runs.items():
        axes[0].plot(
            [e["slot"] for e in evals], [e["test_accuracy"] for e in evals], marker="o", ms=3, label=name
        )
        slots = np.array([r["slot"] for r in history])
        axes[1].plot(slots, [r["backlog"] for r in history], label=name)
        tp = _smooth(np.array([r["throughput"] for r in history], dtype=float), 5)
        axes[2].plot(slots[len(slots) - len(tp) :], tp, label=name)
    axes[0].set(xlabel="slot", ylabel="test accuracy", title="accuracy vs slots")
    axes[1].set(
        xlabel="slot", ylabel="tokens queued (all servers)", title="backlog vs slots", yscale="symlog"
    )
    axes[2].set(xlabel="slot", ylabel="token-computations served / slot", title="throughput (5-slot mean)")
    axes[0].legend(fontsize=8)
    return _finish(fig, axes, title, out)


def plot_servers(history: Sequence[Mapping[str, Any]], num_servers: int, out: Path, title: str = "") -> Path:
    """Per-server backlog and frequency of one run (rows hold ``[E]`` arrays ``backlog_E``, ``freq_ghz_E``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    slots = [r["slot"] for r in history]
    backlog_TE = np.array([r["backlog_E"] for r in history]).reshape(len(history), num_servers)
    freq_TE = np.array([r["freq_ghz_E"] for r in history]).reshape(len(history), num_servers)
    for j in range(num_servers):
        axes[0].plot(slots, backlog_TE[:, j], label=f"server {j}")
        axes[1].plot(slots, freq_TE[:, j], label=f"server {j}")
    axes[0].set(xlabel="slot", ylabel="queued tokens", title="backlog per server")
    axes[1].set(xlabel="slot", ylabel="GHz", title="frequency per server")
    axes[1].legend(fontsize=7, ncol=2)
    return _finish(fig, axes, title, out)


def _finish(fig: plt.Figure, axes: Sequence[plt.Axes], title: str, out: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
