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


def combine_rows(y_RD: Tensor, pos_TK: Tensor, weights_TK: Tensor | None = None) -> Tensor:
    """``out[t] = Σ_j w_tj · y[pos_tj]`` in one fused gather-reduce; unkept slots point at a zero row."""
    return F.embedding_bag(pos_TK, y_RD, per_sample_weights=weights_TK, mode="sum")


def combine(y_ND: Tensor, plan: SortedPlan, weights_TK: Tensor) -> Tensor:
    """Differentiable combine of sorted expert outputs ``y_ND`` with the routing's weights."""
    y_RD = torch.cat([y_ND, y_ND.new_zeros(1, y_ND.shape[-1])])
    return combine_rows(y_RD, plan.pos_TK, weights_TK.to(y_ND.dtype))


@dataclass
class TailGrid:
    """Rows of the ``M`` busiest experts beyond the main grid's capacity: an ``[M, C2]`` grid.

    It starts at row ``start``; row block i belongs to expert ``experts_M[i]``.
    """

    experts_M: Tensor
    capacity: int
    start: int


@dataclass
class RowLayout:
    """Where each expert's rows live in the buffer the expert GEMMs run on.

    Either ``split`` (the sorted rows, expert e owning ``ranges``; padding-free, one GEMM per
    expert) or ``grid`` (an ``[E, C]`` grid, padding rows inert; one batched GEMM for all
    experts), optionally followed by a ``tail`` grid holding the rows of the experts whose load
    exceeds C (one more batched GEMM over copies of those experts' weights). ``token_ids_R``
    gives the token of every row (0 for padding rows), ``slot_ids_R`` its flattened slot
    ``t·K + j`` (``T·K`` for padding: a zero weight), ``pos_TK`` the row of every slot (``rows``
    for an unkept slot: the appended zero row).
    """

    token_ids_R: Tensor
    slot_ids_R: Tensor
    pos_TK: Tensor
    rows: int
    ranges: list[tuple[int, int, int]] | None = None
    grid: tuple[int, int] | None = None
    tail: TailGrid | None = None


def split_layout(plan: SortedPlan) -> RowLayout:
    """Padding-free layout: the sorted rows, one contiguous range per expert."""
    ranges, start = [], 0
    for e, c in enumerate(plan.counts):
        if c:
            ranges.append((e, start, start + c))
        start += c
    return RowLayout(plan.token_ids_N, plan.order_N, plan.pos_TK, plan.num_rows, ranges=ranges)


def grid_layout(plan: SortedPlan, capacity: int) -> RowLayout:
    """``[E, capacity]`` layout: expert e's first ``capacity`` rows start at e·capacity; the
    rows of experts with a larger load continue in a :class:`TailGrid` after ``E·capacity``."""
    num_experts = len(plan.counts)
    device = plan.token_ids_N.device
    over = [e for e, c in enumerate(plan.counts) if c > capacity]
    tail = None
    rows = num_experts * capacity
    if over:
        tail_cap = max(plan.counts[e] for e in over) - capacity
        tail = TailGrid(torch.tensor(over, device=device), tail_cap, rows)
        rows += len(over) * tail_cap
    rows_N = padded_positions(plan, capacity, tail)
    token_ids_R = torch.zeros(rows, dtype=torch.long, device=device).index_copy_(0, rows_N, plan.token_ids_N)
    num_slots = plan.pos_TK.numel()
    slot_ids_R = torch.full((rows,), num_slots, dtype=torch.long, device=device).index_copy_(
        0, rows_N, plan.order_N
    )
    pos = torch.full((num_slots,), rows, dtype=torch.long, device=device).index_copy_(0, plan.order_N, rows_N)
    return RowLayout(
        token_ids_R, slot_ids_R, pos.view_as(plan.pos_TK), rows, grid=(num_experts, capacity), tail=tail
    )


def padded_positions(plan: SortedPlan, capacity: int, tail: TailGrid | None = None) -> Tensor:
    """Row of each sorted assignment in a flattened ``[E, capacity]`` grid (expert·C + rank).

    With a ``tail``, ranks at or beyond ``capacity`` go to the tail grid instead.
    """
    counts_E = torch.tensor(plan.counts, device=plan.token_ids_N.device)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(plan.num_rows, device=counts_E.device) - starts_E[plan.expert_ids_N]
    rows_N = plan.expert_ids_N * capacity + rank_N
    if tail is None:
        return rows_N
    block_E = torch.zeros_like(counts_E)
    block_E[tail.experts_M] = torch.arange(tail.experts_M.numel(), device=counts_E.device)
    tail_rows_N = tail.start + block_E[plan.expert_ids_N] * tail.capacity + rank_N - capacity
    return torch.where(rank_N < capacity, rows_N, tail_rows_N)
