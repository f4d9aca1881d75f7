"""ETR router experiments: theory check, synthetic task, CIFAR-10 patch tokens, speed.

    python benchmarks/etr.py                   # every part (~40 min on 2 shared cores)
    python benchmarks/etr.py --part theory     # one part (theory | synthetic | cifar10 | speed)
    python benchmarks/etr.py --part cifar10 --seeds 0 --arms etr_fixed_0.66   # one arm, merged
    python benchmarks/etr.py --quick           # tiny sizes, for a smoke run
    python benchmarks/etr.py --tables          # markdown tables of the stored results

Each part writes ``<out>/<part>.json`` plus PNG plots (default ``benchmarks/results/etr``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm
from torch import nn
from tqdm import tqdm

from edgemoe.config import to_dict
from edgemoe.moe import EXECUTORS, MoEConfig, MoELayer, RouterConfig, Routing, TopKRouterConfig
from edgemoe.moe.etr import CapacityConfig, ETRRouterConfig, slots_to_mask, token_choice
from edgemoe.moe.routing import expert_capacity, expert_choice

HERE = Path(__file__).resolve().parent


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- part 1: theory (MC)


def separation_for_fpr(fpr: float) -> float:
    """Mean affinity gap s with P(noise affinity > relevant affinity) = fpr for unit Gaussian noise."""
    return math.sqrt(2.0) * float(norm.isf(fpr))


def sample_affinities(
    gen: torch.Generator, trials: int, tokens: int, experts: int, relevant_per_expert: int, fpr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinity ``a_ti = s·[t relevant to i] + N(0,1)`` and each token's own expert (-1 for noise)."""
    owner_T = torch.full((tokens,), -1, dtype=torch.long)
    owner_T[: experts * relevant_per_expert] = torch.arange(experts).repeat_interleave(relevant_per_expert)
    owner_NT = torch.stack([owner_T[torch.randperm(tokens, generator=gen)] for _ in range(trials)])
    aff_NTE = torch.randn(trials, tokens, experts, generator=gen)
    relevant_NTE = owner_one_hot(owner_NT, experts)
    return aff_NTE + separation_for_fpr(fpr) * relevant_NTE, owner_NT


def owner_one_hot(owner_NT: torch.Tensor, experts: int) -> torch.Tensor:
    """One-hot of the owning expert; all-zero rows for noise tokens (owner -1)."""
    return (owner_NT.unsqueeze(-1) == torch.arange(experts)).float()


def keep_first_come(proposed_NTE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Switch-style capacity: each expert keeps its first ``capacity`` proposers in token order."""
    position_NTE = proposed_NTE.long().cumsum(-2) - 1
    return proposed_NTE & (position_NTE < capacity)


def routing_success(
    aff_NTE: torch.Tensor, owner_NT: torch.Tensor, capacity: int, temperature: float, l_max: int
) -> dict[str, dict[str, float]]:
    """Per arm: success, recall and precision of the kept (token, expert) pairs.

    recall: relevant tokens kept by their own expert; success: kept by their own expert and by no
    other (the token's mixture output is its own expert's alone); precision: kept slots that hold a
    token relevant to that expert.
    """
    experts = aff_NTE.shape[-1]
    relevant_NTE = owner_one_hot(owner_NT, experts).bool()
    gate_NTE = torch.softmax(aff_NTE / temperature, dim=-1)
    top1_NTE = slots_to_mask(*token_choice(gate_NTE, 1, 1.0), experts)
    arms = {
        "token_choice": keep_first_come(top1_NTE, capacity),
        "expert_choice": expert_choice(aff_NTE, capacity),
        "hybrid_l1": expert_choice(aff_NTE, capacity, top1_NTE),
    }
    if l_max > 1:
        proposed_NTE = slots_to_mask(*token_choice(gate_NTE, l_max, 0.9), experts)
        arms[f"hybrid_l{l_max}"] = expert_choice(aff_NTE, capacity, proposed_NTE)
    out = {}
    for name, kept_NTE in arms.items():
        hits_NTE = kept_NTE & relevant_NTE
        exclusive_NT = hits_NTE.any(-1) & (kept_NTE.sum(-1) == 1)
        hits = hits_NTE.sum().item()
        out[name] = {
            "success": exclusive_NT.sum().item() / relevant_NTE.sum().item(),
            "recall": hits / relevant_NTE.sum().item(),
            "precision": hits / max(1, kept_NTE.sum().item()),
        }
    return out


def _dominance(grid: list[dict], arm: str, metric: str, slack: float = 0.005) -> dict[str, int]:
    """Grid cells where ``arm`` is at least as good as each baseline (within Monte-Carlo slack)."""
    ge = {
        base: sum(g[arm][metric] >= g[base][metric] - slack for g in grid)
        for base in ("token_choice", "expert_choice")
    }
    both = sum(
        g[arm][metric] >= max(g["token_choice"][metric], g["expert_choice"][metric]) - slack for g in grid
    )
    return {
        "ge_token_choice": ge["token_choice"],
        "ge_expert_choice": ge["expert_choice"],
        "ge_both": both,
        "cells": len(grid),
    }


def run_theory(out: Path, quick: bool) -> dict:
    """Monte-Carlo success rates over a (capacity factor × false-positive rate) grid."""
    gen = torch.Generator().manual_seed(0)
    tokens, experts, relevant = 128, 8, 4
    trials = 40 if quick else 400
    factors = [0.25, 0.5, 0.75, 1.0, 1.1, 1.5, 2.0]
    fprs = [0.01, 0.03, 0.1, 0.2, 0.3]
    grid = []
    for fpr in fprs:
        aff_NTE, owner_NT = sample_affinities(gen, trials, tokens, experts, relevant, fpr)
        for cf in factors:
            cap = expert_capacity(cf, tokens, experts)
            res = routing_success(aff_NTE, owner_NT, cap, temperature=0.5, l_max=2)
            grid.append({"fpr": fpr, "capacity_factor": cf, "capacity": cap, **res})
    arms = [k for k in grid[0] if k not in ("fpr", "capacity_factor", "capacity")]
    dominance = {
        metric: {arm: _dominance(grid, arm, metric) for arm in arms if arm.startswith("hybrid")}
        for metric in ("success", "recall")
    }
    result = {
        "setup": {
            "tokens": tokens,
            "experts": experts,
            "relevant_per_expert": relevant,
            "trials": trials,
            "gate_temperature": 0.5,
            "affinity_model": "a_ti = s*[t relevant to i] + N(0,1), s = sqrt(2)*Phi^-1(1-fpr)",
        },
        "grid": grid,
        "dominance": dominance,
    }
    _write_json(out / "theory.json", result)
    plt = _plt()
    fig, axes = plt.subplots(1, len(fprs), figsize=(3.2 * len(fprs), 3.2), sharey=True)
    for ax, fpr in zip(axes, fprs):
        rows = [g for g in grid if g["fpr"] == fpr]
        for arm in arms:
            ax.plot([r["capacity_factor"] for r in rows], [r[arm]["success"] for r in rows], "o-", label=arm)
        ax.set_title(f"false-positive rate {fpr}")
        ax.set_xlabel("capacity factor")
    axes[0].set_ylabel("success (own expert only)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "theory_success.png", dpi=110)
    plt.close(fig)
    return result


# ----------------------------------------------------------------------------- shared training bits


def etr_router(selection: str = "bidirectional", schedule: dict | None = None, **fields) -> ETRRouterConfig:
    """An ETR router config with ℓ_max = 1 (the paper's top-1 setting) and raw gate combine weights."""
    capacity = CapacityConfig(**{"schedule": "fixed", "factor": 1.1, **(schedule or {})})
    return ETRRouterConfig(top_k=1, renormalize=False, selection=selection, capacity=capacity, **fields)


def top1_router(capacity_factor: float = 1.1) -> TopKRouterConfig:
    """Switch-style top-1 learned linear router with first-come capacity."""
    return TopKRouterConfig(top_k=1, renormalize=False, capacity_factor=capacity_factor)


def aux_loss(routing: Routing) -> torch.Tensor:
    """α = 0.01 Switch load balance, plus μ = 0.01 locality where the router provides it."""
    loss = 0.01 * routing.aux_losses["load_balance"]
    if "locality" in routing.aux_losses:
        loss = loss + 0.01 * routing.aux_losses["locality"]
    return loss


def routing_record(routing: Routing) -> dict[str, float]:
    """Per-step routing telemetry as floats."""
    stats = routing.stats
    experts = routing.num_experts
    fair = routing.num_tokens / experts
    return {
        "kept_per_expert_mean": float(stats.load_mean),
        "kept_per_expert_max": float(stats.load_max),
        "kept_mean_over_fair": float(stats.load_mean) / fair,
        "kept_max_over_fair": float(stats.load_max) / fair,
        "drop_rate": float(stats.drop_rate),
        "unrouted_fraction": float(stats.unrouted_fraction),
        "load_max_over_mean": float(stats.load_max) / max(float(stats.load_mean), 1e-9),
        "capacity": float(stats.capacity or 0),
        "capacity_factor": float(routing.extras.get("capacity_factor", 0.0)),
    }


def mean_records(records: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


# --------------------------------------------------------------------------- part 2: synthetic task


class SequenceClassifier(nn.Module):
    """Token embedding -> MoE layer -> sum over tokens -> linear classifier.

    No residual around the MoE: a token dropped by every expert contributes nothing, so the class is
    only readable if the discriminative token reaches an expert.
    """

    def __init__(self, d_in: int, dim: int, experts: int, classes: int, router: RouterConfig):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.moe = MoELayer(
            MoEConfig(dim=dim, hidden_dim=2 * dim, num_experts=experts, router=router, expert="mlp")
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        out_BSD, routing = self.moe(self.embed(x_BSD))
        return self.head(out_BSD.sum(1)), routing


def synthetic_batch(
    gen: torch.Generator, prototypes_KD: torch.Tensor, batch: int, seq: int, amplitude: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of unit-Gaussian noise tokens with one ``amplitude·prototype + noise`` token each."""
    classes, d_in = prototypes_KD.shape
    x_BSD = torch.randn(batch, seq, d_in, generator=gen)
    y_B = torch.randint(classes, (batch,), generator=gen)
    pos_B = torch.randint(seq, (batch,), generator=gen)
    x_BSD[torch.arange(batch), pos_B] += amplitude * prototypes_KD[y_B]
    return x_BSD, y_B, pos_B


def discriminative_kept(routing: Routing, pos_B: torch.Tensor, seq: int) -> float:
    """Fraction of discriminative tokens kept by at least one expert."""
    rows_B = torch.arange(pos_B.numel()) * seq + pos_B
    return float(routing.kept_TK[rows_B].any(-1).float().mean())


SYNTHETIC = {
    "d_in": 16,
    "dim": 32,
    "experts": 4,
    "classes": 4,
    "seq": 16,
    "batch": 64,
    "amplitude": 4.0,
    "lr": 1e-2,
}


def train_synthetic(selection: str, factor: float, steps: int, seed: int) -> dict:
    """Train one model at a fixed capacity factor; trace how often the discriminative token is kept."""
    c = SYNTHETIC
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prototypes_KD = torch.nn.functional.normalize(torch.randn(c["classes"], c["d_in"], generator=gen), dim=-1)
    router = etr_router(selection, schedule={"factor": factor}, temperature=0.1)
    model = SequenceClassifier(c["d_in"], c["dim"], c["experts"], c["classes"], router)
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
    kept_trace = []
    for _ in range(steps):
        x, y, pos = synthetic_batch(gen, prototypes_KD, c["batch"], c["seq"], c["amplitude"])
        logits, routing = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + aux_loss(routing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.moe.step()
        kept_trace.append(discriminative_kept(routing, pos, c["seq"]))
    val_gen = torch.Generator().manual_seed(10_000 + seed)
    x, y, pos = synthetic_batch(val_gen, prototypes_KD, 2048, c["seq"], c["amplitude"])
    with torch.no_grad():
        model.eval()
        acc_inference = float((model(x)[0].argmax(-1) == y).float().mean())
        model.moe.router.train()
        logits, routing = model(x)
    return {
        "val_accuracy_inference": acc_inference,
        "val_accuracy_with_capacity": float((logits.argmax(-1) == y).float().mean()),
        "final_discriminative_kept": float(np.mean(kept_trace[-50:])),
        "trace": kept_trace,
    }


def smallest_factor(rows: list[dict], key: str, keep: float = 0.99) -> float:
    """Smallest capacity factor whose ``key`` accuracy is >= ``keep`` x the best over ``rows``."""
    best = max(r[key] for r in rows)
    return min(r["capacity_factor"] for r in rows if r[key] >= keep * best)


def run_synthetic(out: Path, quick: bool) -> dict:
    """Capacity sweep on the one-discriminative-token task: ETR vs GrAP token choice (first-come)."""
    factors = [0.06, 0.12, 0.25, 0.5, 0.66, 1.1]
    seeds = [0] if quick else [0, 1]
    steps = 30 if quick else 600
    arms = {"etr": "bidirectional", "token_choice": "token"}
    rows, traces = [], {}
    jobs = [(a, f) for a in arms for f in factors]
    for arm, factor in tqdm(jobs, desc="synthetic", leave=False):
        runs = [train_synthetic(arms[arm], factor, steps, seed) for seed in seeds]
        row = {"arm": arm, "capacity_factor": factor}
        for key in ("val_accuracy_inference", "val_accuracy_with_capacity", "final_discriminative_kept"):
            row[key] = float(np.mean([r[key] for r in runs]))
        rows.append(row)
        traces[f"{arm}@{factor}"] = np.mean([r["trace"] for r in runs], axis=0).round(4).tolist()
    result = {
        "setup": {**SYNTHETIC, "steps": steps, "seeds": seeds, "l_max": 1, "schedule": "fixed"},
        "smallest_factor_99pct": {
            arm: {
                key: smallest_factor([r for r in rows if r["arm"] == arm], key)
                for key in ("val_accuracy_inference", "val_accuracy_with_capacity")
            }
            for arm in arms
        },
        "rows": rows,
        "discriminative_kept_traces": traces,
    }
    _write_json(out / "synthetic.json", result)
    plot_synthetic(out, rows, traces, factors)
    return result


def plot_synthetic(out: Path, rows: list[dict], traces: dict, factors: list[float]) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(factors)))
    for factor, color in zip(factors, colors):
        for arm, style in (("etr", "-"), ("token_choice", ":")):
            kept = np.convolve(traces[f"{arm}@{factor}"], np.ones(20) / 20, mode="valid")
            ax1.plot(kept, style, color=color, label=f"{arm} cf {factor}")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("discriminative token kept (20-step mean)")
    ax1.legend(fontsize=6, ncol=2)
    for arm, marker in (("etr", "o"), ("token_choice", "s")):
        sub = [r for r in rows if r["arm"] == arm]
        xs = [r["capacity_factor"] for r in sub]
        ax2.plot(xs, [r["val_accuracy_inference"] for r in sub], marker + "-", label=f"{arm}: inference")
        ax2.plot(
            xs, [r["val_accuracy_with_capacity"] for r in sub], marker + "--", label=f"{arm}: with capacity"
        )
    ax2.set_xscale("log")
    ax2.set_xlabel("capacity factor")
    ax2.set_ylabel("val accuracy")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "synthetic.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------ part 3: CIFAR-10 patches

CIFAR = {
    "train_images": 10_000,
    "val_images": 10_000,
    "patch": 4,
    "dim": 64,
    "heads": 4,
    "experts": 8,
    "hidden": 128,
    "batch": 128,
    "epochs": 8,
    "lr": 2e-3,
    "weight_decay": 0.05,
}


class PatchViT(nn.Module):
    """One pre-norm transformer block whose feed-forward is the MoE layer, on 4x4 patch tokens."""

    def __init__(self, patch_dim: int, tokens: int, classes: int, router: RouterConfig, c: dict):
        super().__init__()
        dim = c["dim"]
        self.embed = nn.Linear(patch_dim, dim)
        self.pos_1PD = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, c["heads"], batch_first=True)
        self.norm_moe = nn.LayerNorm(dim)
        moe = MoEConfig(
            dim=dim, hidden_dim=c["hidden"], num_experts=c["experts"], router=router, expert="mlp"
        )
        self.moe = MoELayer(moe)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens_NPF: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        h_NPD = self.embed(tokens_NPF) + self.pos_1PD
        a_NPD = self.norm_attn(h_NPD)
        h_NPD = h_NPD + self.attn(a_NPD, a_NPD, a_NPD, need_weights=False)[0]
        moe_NPD, routing = self.moe(self.norm_moe(h_NPD))
        h_NPD = h_NPD + moe_NPD
        return self.head(self.norm_out(h_NPD).mean(1)), routing


def cifar_arms(anneal_steps: int) -> dict[str, RouterConfig]:
    """The five compared arms, plus a 0.6 floor and the settle-triggered schedule.

    'annealed' moves linearly over ``anneal_steps``; 'settle' lowers the factor by 0.04 whenever
    the rearranged fraction's EMA moved less than 0.01 over 20 steps.
    """
    annealed = {"schedule": "annealed", "factor": 1.1, "floor": 0.66, "anneal_steps": anneal_steps}
    return {
        "top1_linear_cf1.1": top1_router(1.1),
        "grap_token_choice_cf1.1": etr_router("token", {"factor": 1.1}),
        "expert_choice_annealed": etr_router("expert", annealed),
        "etr_annealed_1.1_to_0.66": etr_router("bidirectional", annealed),
        "etr_fixed_0.66": etr_router("bidirectional", {"factor": 0.66}),
        "etr_annealed_1.1_to_0.6": etr_router("bidirectional", {**annealed, "floor": 0.6}),
        "etr_settle_1.1_to_0.66": etr_router("bidirectional", {**annealed, "anneal_by": "settle"}),
    }


def load_cifar(data_dir: Path | None, c: dict) -> tuple[torch.Tensor, ...]:
    """Seeded class-balanced subsets of the CIFAR-10 JPEG archive, standardised, as NCHW tensors."""
    from edgemoe.train.data import load_dataset

    ds = load_dataset(
        "cifar10", data_dir, train_subset=c["train_images"], test_subset=c["val_images"], seed=0
    )
    return ds.x_train_NCHW, ds.y_train_N, ds.x_test_NCHW, ds.y_test_N


def evaluate(model: PatchViT, x_NCHW: torch.Tensor, y_N: torch.Tensor, c: dict) -> dict[str, float]:
    """Validation accuracy in batches of the training size, in the router's inference mode.

    ETR (and GrAP token choice) infer without capacity; the top-1 router keeps its capacity at
    inference (Switch semantics), so it is also scored dropless (cf = 0) for a like-for-like number.
    """
    from edgemoe.train.data import patchify

    def accuracy() -> tuple[float, float]:
        correct, drops = 0, []
        for i in range(0, len(y_N), c["batch"]):
            logits, routing = model(patchify(x_NCHW[i : i + c["batch"]], c["patch"]))
            correct += int((logits.argmax(-1) == y_N[i : i + c["batch"]]).sum())
            drops.append(float(routing.stats.drop_rate))
        return correct / len(y_N), float(np.mean(drops))

    router = model.moe.router
    model.eval()
    with torch.no_grad():
        acc, drop = accuracy()
        acc_dropless = acc
        if router.cfg.name == "topk":
            saved = router.cfg
            router.cfg = dataclasses.replace(saved, capacity_factor=0.0)
            acc_dropless = accuracy()[0]
            router.cfg = saved
    model.train()
    return {"val_accuracy": acc, "val_accuracy_dropless": acc_dropless, "val_drop_rate": drop}


def train_cifar_arm(
    name: str, router: RouterConfig, data: tuple[torch.Tensor, ...], c: dict, seed: int
) -> dict:
    """Train one arm; every arm of a seed gets the same init seed and data order."""
    from edgemoe.train.data import patchify

    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    tokens = (x_train.shape[-1] // c["patch"]) ** 2
    model = PatchViT(3 * c["patch"] ** 2, tokens, 10, router, c)
    steps_per_epoch = len(y_train) // c["batch"]
    total = steps_per_epoch * c["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c["lr"], total_steps=total, pct_start=0.1)
    order_gen = torch.Generator().manual_seed(seed)
    epochs = []
    for epoch in tqdm(range(c["epochs"]), desc=name, leave=False):
        perm = torch.randperm(len(y_train), generator=order_gen)
        records, step_times = [], []
        for b in range(steps_per_epoch):
            idx = perm[b * c["batch"] : (b + 1) * c["batch"]]
            x = x_train[idx]
            flip = torch.rand(len(idx), generator=order_gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            t0 = time.perf_counter()
            logits, routing = model(patchify(x, c["patch"]))
            loss = torch.nn.functional.cross_entropy(logits, y_train[idx]) + aux_loss(routing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.moe.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
            records.append(routing_record(routing))
        row = {
            "epoch": epoch + 1,
            **mean_records(records),
            "step_time_s_median": float(np.median(step_times)),
        }
        row.update(evaluate(model, x_val, y_val, c))
        epochs.append(row)
        tqdm.write(
            f"  {name} epoch {epoch + 1}: acc {row['val_accuracy']:.3f} kept/expert {row['kept_per_expert_mean']:.0f}"
        )
    return {
        "arm": name,
        "seed": seed,
        "router": to_dict(router),
        "final": epochs[-1],
        "epochs": epochs,
    }


def compare_to_top1(results: list[dict]) -> None:
    """Add each arm's token saving and accuracy delta against the top-1 arm of the same seed."""
    for r in results:
        base = next(
            (b["final"] for b in results if b["seed"] == r["seed"] and b["arm"].startswith("top1")), None
        )
        if base is None:
            continue
        f = r["final"]
        r["vs_top1"] = {
            "fewer_tokens_per_expert_mean": 1.0 - f["kept_per_expert_mean"] / base["kept_per_expert_mean"],
            "fewer_tokens_per_expert_max": 1.0 - f["kept_per_expert_max"] / base["kept_per_expert_max"],
            "val_accuracy_delta_points": 100.0 * (f["val_accuracy"] - base["val_accuracy"]),
            "val_accuracy_delta_points_vs_dropless_top1": 100.0
            * (f["val_accuracy"] - base["val_accuracy_dropless"]),
        }


def summarise(results: list[dict]) -> list[dict]:
    """Per arm, the mean over seeds of the final-epoch metrics and of the comparison to top-1."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm and "vs_top1" in r]
        if not runs:
            continue
        row = {"arm": arm, "seeds": [r["seed"] for r in runs]}
        row.update(mean_records([r["final"] for r in runs]))
        row.update(mean_records([r["vs_top1"] for r in runs]))
        rows.append(row)
    return rows


def run_cifar10(
    out: Path,
    quick: bool,
    data_dir: Path | None = None,
    seeds: tuple[int, ...] = (0,),
    only: tuple[str, ...] = (),
) -> dict:
    """The CIFAR-10 patch-token comparison (the five compared arms plus two ETR variants), per seed.

    ``only`` runs a subset of the arms and merges them into the existing ``cifar10.json`` (same
    arm and seed replaced). The JSON is rewritten after every arm, so a long run leaves usable
    partial results.
    """
    c = dict(CIFAR)
    if quick:
        c.update(train_images=512, val_images=256, epochs=1)
    data = load_cifar(data_dir, c)
    steps = (c["train_images"] // c["batch"]) * c["epochs"]
    setup = {
        **c,
        "tokens_per_image": 64,
        "tokens_per_step": 64 * c["batch"],
        "threads": torch.get_num_threads(),
    }
    arms = cifar_arms(max(1, steps // 2))
    unknown = sorted(set(only) - set(arms))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {sorted(arms)}")
    path = out / "cifar10.json"
    results: list[dict] = json.loads(path.read_text())["arms"] if only and path.exists() else []
    result: dict = {}
    for seed in seeds:
        for name, router in arms.items():
            if only and name not in only:
                continue
            results = [r for r in results if (r["arm"], r["seed"]) != (name, seed)]
            results.append(train_cifar_arm(name, router, data, c, seed))
            results.sort(key=lambda r: (r["seed"], list(arms).index(r["arm"])))
            compare_to_top1(results)
            result = {"setup": setup, "summary": summarise(results), "arms": results}
            _write_json(path, result)
    plot_cifar(out, [r for r in results if r["seed"] == min(r["seed"] for r in results)])
    return result


def plot_cifar(out: Path, results: list[dict]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in results:
        ep = [e["epoch"] for e in r["epochs"]]
        axes[0].plot(ep, [e["val_accuracy"] for e in r["epochs"]], "o-", label=r["arm"])
        axes[1].plot(ep, [e["kept_per_expert_mean"] for e in r["epochs"]], "o-", label=r["arm"])
        axes[2].plot(ep, [e["kept_per_expert_max"] for e in r["epochs"]], "o-", label=r["arm"])
    for ax, title in zip(
        axes, ("val accuracy", "kept tokens per expert (mean)", "kept tokens per expert (max)")
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cifar10.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ part 4: speed


def _interleaved_ms(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each callable, alternating them so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 3):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def _layer_step(layer: MoELayer, x_TD: torch.Tensor) -> None:
    out_TD, _ = layer(x_TD)
    out_TD.square().mean().backward()


def run_speed(out: Path, quick: bool) -> dict:
    """Router forward time (ETR vs top-k), and MoE layer fwd+bwd time at capacity 0.66 vs 1.1."""
    tokens, experts = (1024, 8) if quick else (8192, 8)
    repeats = 5 if quick else 30
    routers = []
    for dim in (64, 256, 1024):
        x = torch.randn(tokens, dim)
        built = {
            "topk": top1_router(1.1).build(dim, experts),
            "etr": etr_router().build(dim, experts),
        }
        ms = _interleaved_ms({name: partial(r, x) for name, r in built.items()}, repeats)
        routers.append(
            {"dim": dim, "topk_ms": ms["topk"], "etr_ms": ms["etr"], "etr_over_topk": ms["etr"] / ms["topk"]}
        )
    layers = []
    dim, hidden = 256, 512
    x = torch.randn(tokens, dim)
    for backend in EXECUTORS.names():
        steps = {}
        for factor in (1.1, 0.66):
            torch.manual_seed(0)
            cfg = MoEConfig(
                dim=dim,
                hidden_dim=hidden,
                num_experts=experts,
                router=etr_router(schedule={"factor": factor}),
                expert="mlp",
                executor=backend,
            )
            steps[factor] = partial(_layer_step, MoELayer(cfg), x)
        ms = _interleaved_ms(steps, max(3, repeats // 3))
        layers.append(
            {
                "backend": backend,
                "cf1.1_ms": ms[1.1],
                "cf0.66_ms": ms[0.66],
                "ratio_0.66_over_1.1": ms[0.66] / ms[1.1],
            }
        )
    result = {
        "setup": {
            "tokens": tokens,
            "experts": experts,
            "layer_dim": dim,
            "layer_hidden": hidden,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
        },
        "router_forward": routers,
        "layer_fwd_bwd": layers,
    }
    _write_json(out / "speed.json", result)
    return result


PARTS = {"theory": run_theory, "synthetic": run_synthetic, "cifar10": run_cifar10, "speed": run_speed}


def markdown_tables(out: Path) -> str:
    """The CIFAR-10 and speed tables of docs/results.md and docs/benchmarks.md, from the JSON."""
    lines = []
    cifar = out / "cifar10.json"
    if cifar.exists():
        data = json.loads(cifar.read_text())
        lines += [
            "| arm | seeds | val acc | Δ vs top-1 (pts) | Δ vs dropless top-1 (pts) | kept/expert mean | max "
            "| fewer than top-1: mean | max | drop rate | load max/mean | step time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["summary"]:
            lines.append(
                f"| {r['arm']} | {len(r['seeds'])} | {r['val_accuracy']:.4f} | {r['val_accuracy_delta_points']:+.2f} "
                f"| {r['val_accuracy_delta_points_vs_dropless_top1']:+.2f} "
                f"| {r['kept_per_expert_mean']:.0f} | {r['kept_per_expert_max']:.0f} "
                f"| {100 * r['fewer_tokens_per_expert_mean']:.1f} % | {100 * r['fewer_tokens_per_expert_max']:.1f} % "
                f"| {r['drop_rate']:.3f} | {r['load_max_over_mean']:.2f} | {r['step_time_s_median']:.3f} |"
            )
    speed = out / "speed.json"
    if speed.exists():
        data = json.loads(speed.read_text())
        lines += ["", "| d | top-k router (ms) | ETR router (ms) | ETR / top-k |", "|---|---|---|---|"]
        for r in data["router_forward"]:
            lines.append(
                f"| {r['dim']} | {r['topk_ms']:.2f} | {r['etr_ms']:.2f} | {r['etr_over_topk']:.2f} |"
            )
        lines += ["", "| backend | cf 1.1 (ms) | cf 0.66 (ms) | 0.66 / 1.1 |", "|---|---|---|---|"]
        for r in data["layer_fwd_bwd"]:
            lines.append(
                f"| {r['backend']} | {r['cf1.1_ms']:.1f} | {r['cf0.66_ms']:.1f} | {r['ratio_0.66_over_1.1']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "etr")
    parser.add_argument(
        "--tables", action="store_true", help="print the markdown tables of the results and exit"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding cifar10_jpeg.zip")
    parser.add_argument(
        "--arms", nargs="+", default=[], help="cifar10: run only these arms, merged into the JSON"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="cifar10 seeds")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ETR_THREADS", "2")))
    args = parser.parse_args(argv)
    if args.tables:
        print(markdown_tables(args.out))
        return 0
    torch.set_num_threads(args.threads)
    parts = list(PARTS) if args.part == "all" else [args.part]
    for name in parts:
        t0 = time.perf_counter()
        if name == "cifar10":
            run_cifar10(args.out, args.quick, args.data_dir, tuple(args.seeds), tuple(args.arms))
        else:
            PARTS[name](args.out, args.quick)
        print(f"etr {name}: done in {time.perf_counter() - t0:.1f}s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
