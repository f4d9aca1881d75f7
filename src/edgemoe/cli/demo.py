"""``edgemoe demo``: train a small MoE classifier on scikit-learn's bundled 8×8 digits.

Prints per-expert load, drop rate and test accuracy, and writes a run folder with
``summary.json``, a per-epoch CSV trace and a PNG plot. Runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from edgemoe.cli.common import add_config_args, load_config_dict, run_dir, write_json
from edgemoe.config import check_positive, check_range, from_dict, require, to_dict


@dataclass
class DemoConfig:
    """Settings of the digits demo (all overridable with ``--set key=value``)."""

    epochs: int = 25
    batch_size: int = 64
    lr: float = 3e-3
    dim: int = 48
    hidden_dim: int = 96
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    router: str = "topk"
    backend: str = "auto"
    load_balance_coef: float = 0.01
    z_loss_coef: float = 1e-3
    test_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "dim", "hidden_dim", "num_experts", "top_k"):
            check_positive(getattr(self, name), name)
        check_positive(self.lr, "lr")
        check_positive(self.load_balance_coef, "load_balance_coef", allow_zero=True)
        check_positive(self.z_loss_coef, "z_loss_coef", allow_zero=True)
        check_range(self.test_fraction, "test_fraction", 0.05, 0.9)
        require(
            self.top_k <= self.num_experts,
            "top_k",
            f"must be <= num_experts ({self.num_experts}), got {self.top_k}",
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a small MoE classifier on the bundled digits")
    add_config_args(parser)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/demo-<time>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    # The model is tiny: extra intra-op threads only add synchronisation cost (and spin on a busy CPU).
    torch.set_num_threads(1)
    cfg = from_dict(DemoConfig, load_config_dict(args))
    out = run_dir(args.out, "runs", "demo")
    summary, trace = train_digits(cfg)
    summary["config"] = to_dict(cfg)
    write_json(out / "summary.json", summary)
    write_trace(out / "trace.csv", trace)
    plot_trace(out / "trace.png", trace, summary["tokens_per_expert"])
    print_report(summary, out)
    return 0


def train_digits(cfg: DemoConfig) -> tuple[dict, list[dict]]:
    """Train ``embed -> MoE (+ residual) -> head`` on digits; return the summary and per-epoch trace."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn
    from tqdm import tqdm

    from edgemoe.moe import MoEConfig, MoELayer, RouterConfig

    torch.manual_seed(cfg.seed)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=digits.target
    )
    x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    y_tr, y_te = torch.from_numpy(y_tr).long(), torch.from_numpy(y_te).long()

    router = RouterConfig(name=cfg.router, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)
    moe = MoELayer(
        MoEConfig(
            dim=cfg.dim,
            hidden_dim=cfg.hidden_dim,
            num_experts=cfg.num_experts,
            router=router,
            backend=cfg.backend,
            init_std=0.1,
        )
    )
    embed = nn.Sequential(nn.Linear(64, cfg.dim), nn.LayerNorm(cfg.dim))
    head = nn.Linear(cfg.dim, 10)
    params = [*embed.parameters(), *moe.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def forward(xb: torch.Tensor):
        h = embed(xb)
        out, routing = moe(h)
        return head(h + out), routing

    trace = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in tqdm(range(cfg.epochs), desc="demo", unit="epoch", leave=False):
        moe.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        loss_sum, kept, dropped = 0.0, 0.0, 0.0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits, routing = forward(x_tr[idx])
            task = nn.functional.cross_entropy(logits, y_tr[idx])
            aux = routing.aux_losses
            loss = task + cfg.load_balance_coef * aux["load_balance"] + cfg.z_loss_coef * aux["z_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += task.item() * len(idx)
            kept += float(routing.stats.kept)
            dropped += float(routing.stats.dropped)
        acc, stats = evaluate(forward, moe, x_te, y_te)
        trace.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / len(x_tr),
                "train_drop_rate": dropped / max(kept + dropped, 1.0),
                "test_accuracy": acc,
                "test_drop_rate": stats["drop_rate"],
                "test_load_max_over_mean": stats["load_max"] / max(stats["load_mean"], 1e-9),
                "router_entropy": stats["entropy"],
            }
        )
    acc, stats = evaluate(forward, moe, x_te, y_te)
    summary = {
        "test_accuracy": acc,
        "drop_rate": stats["drop_rate"],
        "tokens_per_expert": stats["tokens_per_expert"],
        "load_max": stats["load_max"],
        "load_mean": stats["load_mean"],
        "capacity": stats["capacity"],
        "router_entropy": stats["entropy"],
        "train_drop_rate_last_epoch": trace[-1]["train_drop_rate"],
        "train_samples": len(x_tr),
        "test_samples": len(x_te),
    }
    return summary, trace


def evaluate(forward, moe, x_te, y_te) -> tuple[float, dict]:
    """Accuracy and routing telemetry on the whole test set (one batch)."""
    import torch

    moe.eval()
    with torch.no_grad():
        logits, routing = forward(x_te)
    acc = float((logits.argmax(-1) == y_te).float().mean())
    return acc, routing.stats.as_dict()


def write_trace(path: Path, trace: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(trace[0]))
        writer.writeheader()
        writer.writerows(trace)


def plot_trace(path: Path, trace: list[dict], tokens_per_expert: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in trace]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, [row["train_loss"] for row in trace])
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].plot(epochs, [row["test_accuracy"] for row in trace], label="test accuracy")
    axes[1].plot(epochs, [row["train_drop_rate"] for row in trace], label="train drop rate")
    axes[1].set(title="accuracy and drops", xlabel="epoch", ylim=(0, 1))
    axes[1].legend()
    axes[2].bar(range(len(tokens_per_expert)), tokens_per_expert)
    axes[2].set(title="test tokens per expert", xlabel="expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_report(summary: dict, out: Path) -> None:
    print("edgemoe demo: MoE classifier on scikit-learn digits")
    print(f"  test accuracy      {summary['test_accuracy']:.3f}  ({summary['test_samples']} test samples)")
    print(
        f"  drop rate          test {summary['drop_rate']:.4f}, last train epoch "
        f"{summary['train_drop_rate_last_epoch']:.4f}  (test capacity {summary['capacity']} per expert)"
    )
    loads = summary["tokens_per_expert"]
    total = max(sum(loads), 1)
    for e, n in enumerate(loads):
        print(f"  expert {e}: {n:5d} tokens  {100 * n / total:5.1f}%  {'#' * round(40 * n / total)}")
    print(f"  load max/mean      {summary['load_max'] / max(summary['load_mean'], 1e-9):.2f}")
    print(f"  results            {out}")
