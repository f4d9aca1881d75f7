"""ETR router experiments: theory check, synthetic task, CIFAR-10 patch tokens.

    python benchmarks/etr.py                   # all three parts
    python benchmarks/etr.py --part theory     # one part (theory | synthetic | cifar10 | speed)
    python benchmarks/etr.py --quick           # tiny sizes, for a smoke run

Each part writes ``<out>/<part>.json`` plus PNG plots (default ``benchmarks/results/etr``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from scipy.stats import norm

from edgemoe.moe.etr import capacity_slots, expert_choice, slots_to_mask, token_choice

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
        "expert_choice": expert_choice(aff_NTE, torch.ones_like(top1_NTE), capacity),
        "hybrid_l1": expert_choice(aff_NTE, top1_NTE, capacity),
    }
    if l_max > 1:
        proposed_NTE = slots_to_mask(*token_choice(gate_NTE, l_max, 0.9), experts)
        arms[f"hybrid_l{l_max}"] = expert_choice(aff_NTE, proposed_NTE, capacity)
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
            cap = capacity_slots(cf, tokens, experts)
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


PARTS = {"theory": run_theory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "etr")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ETR_THREADS", "2")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = list(PARTS) if args.part == "all" else [args.part]
    for name in parts:
        t0 = time.perf_counter()
        PARTS[name](args.out, args.quick)
        print(f"etr {name}: done in {time.perf_counter() - t0:.1f}s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
