"""Dispatch and combine: from a :class:`Routing` to expert-contiguous token buffers and back.

The dispatcher knows nothing about expert weights; backends call it. ``sort_by_expert`` orders the
kept slots by expert with one argsort (the only host sync is reading the per-expert counts, which
every split-based backend needs). The combine is a gather-reduce over each token's slots
(``embedding_bag`` with per-slot weights), which avoids the slow scatter-add of ``index_add_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edgemoe.moe.routing import Routing


@dataclass
class SortedPlan:
    """Kept assignments sorted by expert: ``N`` rows, expert e owns a contiguous row range.

    ``order_N`` are the flattened slot indices (``t·K + j``) of the sorted rows; ``pos_TK`` is the
    inverse map, the sorted row of every slot, or ``N`` (a zero row) for a slot that is not kept.
    """

    token_ids_N: Tensor
    expert_ids_N: Tensor
    order_N: Tensor
    pos_TK: Tensor
    counts: list[int]
    num_tokens: int

    @property
    def num_rows(self) -> int:
        return self.order_N.numel()


def sort_by_expert(routing: Routing) -> SortedPlan:
    """Order the kept slots by expert (stable: by token within an expert)."""
    num_tokens, top_k = routing.expert_ids_TK.shape
    num_experts = routing.num_experts
    key_N = torch.where(routing.kept_TK, routing.expert_ids_TK, num_experts).reshape(-1)
    order_N = torch.argsort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=num_experts + 1).tolist()[:num_experts]
    rows = sum(counts)
    order_N = order_N[:rows]
    pos_N = torch.full_like(key_N, rows)
    pos_N[order_N] = torch.arange(rows, device=key_N.device)
    return SortedPlan(
        token_ids_N=torch.div(order_N, top_k, rounding_mode="floor"),
        expert_ids_N=key_N[order_N],
        order_N=order_N,
        pos_TK=pos_N.view(num_tokens, top_k),
        counts=counts,
        num_tokens=num_tokens,
    )


def gather_rows(x_TD: Tensor, plan: SortedPlan) -> Tensor:
    """``xs[n] = x[token_n]``: the expert-sorted input buffer."""
    return x_TD.index_select(0, plan.token_ids_N)


def combine_rows(y_RD: Tensor, plan: SortedPlan, weights_TK: Tensor | None = None) -> Tensor:
    """``out[t] = Σ_j w_tj · y[pos_tj]``; ``y_RD`` has ``N + 1`` rows, the last one zero."""
    return F.embedding_bag(plan.pos_TK, y_RD, per_sample_weights=weights_TK, mode="sum")


def with_zero_row(y_ND: Tensor) -> Tensor:
    """Append the zero row that unkept slots point at."""
    return torch.cat([y_ND, y_ND.new_zeros(1, y_ND.shape[-1])])


def combine(y_ND: Tensor, plan: SortedPlan, weights_TK: Tensor) -> Tensor:
    """Differentiable combine of sorted expert outputs ``y_ND`` with the routing's weights."""
    return combine_rows(with_zero_row(y_ND), plan, weights_TK.to(y_ND.dtype))


def padded_positions(plan: SortedPlan, capacity: int) -> Tensor:
    """Row of each sorted assignment in a flattened ``[E, capacity]`` grid (expert·C + rank)."""
    counts_E = torch.tensor(plan.counts, device=plan.token_ids_N.device)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(plan.num_rows, device=counts_E.device) - starts_E[plan.expert_ids_N]
    return plan.expert_ids_N * capacity + rank_N
