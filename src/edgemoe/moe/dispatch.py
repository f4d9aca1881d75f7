"""Dispatch and combine: from a :class:`Routing` to expert-contiguous token buffers and back.

The dispatcher knows nothing about expert weights; backends call it. ``sort_by_expert`` orders the
kept slots by expert with one argsort (the only host sync is reading the per-expert counts, which
every split-based backend needs); ``pad_by_expert`` places them in an ``[E, C]`` grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from edgemoe.moe.routing import Routing


@dataclass
class SortedPlan:
    """Kept assignments sorted by expert: ``N`` rows, expert e owns rows ``offsets[e]:offsets[e+1]``."""

    token_ids_N: Tensor
    expert_ids_N: Tensor
    weights_N: Tensor
    counts: list[int]
    num_tokens: int

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for c in self.counts:
            out.append(out[-1] + c)
        return out


def sort_by_expert(routing: Routing) -> SortedPlan:
    """Order the kept slots by expert (stable: by token within an expert)."""
    num_tokens, top_k = routing.expert_ids_TK.shape
    num_experts = routing.num_experts
    key_N = torch.where(routing.kept_TK, routing.expert_ids_TK, num_experts).reshape(-1)
    order_N = torch.argsort(key_N, stable=True)
    counts_all = torch.bincount(key_N, minlength=num_experts + 1).tolist()
    counts = counts_all[:num_experts]
    order_N = order_N[: sum(counts)]
    return SortedPlan(
        token_ids_N=torch.div(order_N, top_k, rounding_mode="floor"),
        expert_ids_N=key_N[order_N],
        weights_N=routing.weights_TK.reshape(-1)[order_N],
        counts=counts,
        num_tokens=num_tokens,
    )


def combine(y_ND: Tensor, plan: SortedPlan) -> Tensor:
    """``out[t] = Σ_n w_n · y_n`` over the assignments n of token t (zero for unrouted tokens)."""
    out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, plan.token_ids_N, y_ND * plan.weights_N.unsqueeze(-1).to(y_ND.dtype))


def padded_positions(plan: SortedPlan, capacity: int) -> Tensor:
    """Row of each sorted assignment in a flattened ``[E, capacity]`` grid (expert·C + rank)."""
    counts_E = torch.tensor(plan.counts, device=plan.token_ids_N.device)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(plan.token_ids_N.numel(), device=counts_E.device) - starts_E[plan.expert_ids_N]
    return plan.expert_ids_N * capacity + rank_N
