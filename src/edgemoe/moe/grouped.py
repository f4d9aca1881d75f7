"""The ``sorted`` backend's kernel: grouped expert GEMMs + combine with a hand-written backward.

Forward on a row buffer holding every kept assignment once (:class:`~edgemoe.moe.dispatch.RowLayout`):
``h = xs W_in[e]`` (one GEMM, gate|up fused), ``a = act(h)``, ``y = a W_out[e]``,
``out[t] = Σ_j w_tj · y[pos_tj]`` (one fused gather-reduce). Backward reuses the saved ``xs``,
``h``, ``silu(gate)``, ``a`` and ``y`` so nothing is recomputed, writes every GEMM result straight
into one preallocated buffer, folds the combine weights into the output gradient once, and reduces
the input gradient with the same gather-reduce (no scatter-add).

The expert GEMMs run either as one batched matmul over an ``[E, C_max]`` grid (padding rows are
inert: their output gradient is zero) or as one GEMM per expert on padding-free slices.
:func:`choose_layout` picks the grid unless padding would waste more than ``max_grid_waste``:
on CPU a single batched matmul parallelises across experts, avoiding one thread barrier per expert
GEMM, which outweighs a modest amount of padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgemoe.moe.dispatch import RowLayout, SortedPlan, combine_rows, grid_layout, split_layout
from edgemoe.moe.experts import GroupedExperts

MAX_GRID_WASTE = 1.0


def choose_layout(plan: SortedPlan, max_grid_waste: float = MAX_GRID_WASTE) -> RowLayout:
    """Grid (batched GEMM) when ``E·C_max`` exceeds the kept rows by at most ``max_grid_waste``."""
    capacity = max(max(plan.counts, default=0), 1)
    if len(plan.counts) * capacity <= (1.0 + max_grid_waste) * max(plan.num_rows, 1):
        return grid_layout(plan, capacity)
    return split_layout(plan)


def _gemm(a_RK: Tensor, w_EKM: Tensor, layout: RowLayout, *, transpose_w: bool, extra_rows: int = 0) -> Tensor:
    """Each expert's rows of ``a`` times ``w[e]`` (or ``w[e]ᵀ``) into one ``[rows + extra, M]`` buffer.

    ``extra_rows`` trailing rows are zeroed (the combine's zero row).
    """
    w = w_EKM.transpose(1, 2) if transpose_w else w_EKM
    rows = layout.rows
    out_RM = a_RK.new_empty(rows + extra_rows, w.shape[2])
    if layout.grid is not None:
        num_experts, cap = layout.grid
        torch.bmm(a_RK.view(num_experts, cap, -1), w, out=out_RM[:rows].view(num_experts, cap, -1))
    else:
        for e, s, t in layout.ranges:
            torch.mm(a_RK[s:t], w[e], out=out_RM[s:t])
    if extra_rows:
        out_RM[rows:].zero_()
    return out_RM


def _wgrad(a_RK: Tensor, g_RM: Tensor, layout: RowLayout, shape: torch.Size) -> Tensor:
    """Per-expert weight gradient ``a_eᵀ g_e``; experts with no rows get zeros."""
    if layout.grid is not None:
        num_experts, cap = layout.grid
        a_ECK = a_RK.view(num_experts, cap, -1)
        return torch.bmm(a_ECK.transpose(1, 2), g_RM.view(num_experts, cap, -1))
    out = a_RK.new_zeros(shape) if len(layout.ranges) < shape[0] else a_RK.new_empty(shape)
    for e, s, t in layout.ranges:
        torch.mm(a_RK[s:t].t(), g_RM[s:t], out=out[e])
    return out


def _act_forward(h_RF: Tensor, kind: str) -> tuple[Tensor, Tensor | None]:
    """``(a, silu(gate))`` for SwiGLU, ``(gelu(h), None)`` for the MLP."""
    if kind != "swiglu":
        return F.gelu(h_RF), None
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    s_RH = F.silu(gate_RH)
    return s_RH * up_RH, s_RH


def _act_backward(da_RH: Tensor, h_RF: Tensor, s_RH: Tensor | None, kind: str) -> Tensor:
    """``dh`` from ``da`` (``da`` is overwritten). Three elementwise passes for SwiGLU."""
    dh_RF = torch.empty_like(h_RF)
    if kind != "swiglu":
        return torch.ops.aten.gelu_backward.grad_input(da_RH, h_RF, grad_input=dh_RF)
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    dgate_RH, dup_RH = dh_RF.chunk(2, dim=-1)
    torch.mul(da_RH, s_RH, out=dup_RH)
    da_RH.mul_(up_RH)
    torch.ops.aten.silu_backward.grad_input(da_RH, gate_RH, grad_input=dgate_RH)
    return dh_RF


class _GroupedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_EDF, w_out_EHD, weights_TK, layout: RowLayout, kind: str):
        xs_RD = x_TD.index_select(0, layout.token_ids_R)
        h_RF = _gemm(xs_RD, w_in_EDF, layout, transpose_w=False)
        a_RH, s_RH = _act_forward(h_RF, kind)
        y_RD = _gemm(a_RH, w_out_EHD, layout, transpose_w=False, extra_rows=1)
        out_TD = combine_rows(y_RD, layout.pos_TK, weights_TK)
        ctx.save_for_backward(xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_EDF, w_out_EHD, weights_TK)
        ctx.layout, ctx.kind = layout, kind
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_EDF, w_out_EHD, weights_TK = ctx.saved_tensors
        layout = ctx.layout
        gy_RD = grad_TD.contiguous().index_select(0, layout.token_ids_R)
        grad_w_TK = None
        if ctx.needs_input_grad[3]:
            dots_R = torch.linalg.vecdot(gy_RD, y_RD[: layout.rows])
            dots_R = torch.cat([dots_R, dots_R.new_zeros(1)])
            grad_w_TK = dots_R.index_select(0, layout.pos_TK.reshape(-1)).view_as(weights_TK)
        w_slots = torch.cat([weights_TK.reshape(-1), weights_TK.new_zeros(1)])
        gy_RD.mul_(w_slots.index_select(0, layout.slot_ids_R).unsqueeze(-1))
        grad_w_out = _wgrad(a_RH, gy_RD, layout, w_out_EHD.shape) if ctx.needs_input_grad[2] else None
        da_RH = _gemm(gy_RD, w_out_EHD, layout, transpose_w=True)
        dh_RF = _act_backward(da_RH, h_RF, s_RH, ctx.kind)
        grad_w_in = _wgrad(xs_RD, dh_RF, layout, w_in_EDF.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxs_RD = _gemm(dh_RF, w_in_EDF, layout, transpose_w=True, extra_rows=1)
            grad_x = combine_rows(dxs_RD, layout.pos_TK)
        return grad_x, grad_w_in, grad_w_out, grad_w_TK, None, None


def grouped_experts_combine(
    experts: GroupedExperts, x_TD: Tensor, plan: SortedPlan, weights_TK: Tensor, layout: RowLayout | None = None
) -> Tensor:
    """``out[t] = Σ_j w_tj · expert_{e_tj}(x_t)`` over the kept slots of ``plan``."""
    return _GroupedExpertsCombine.apply(
        x_TD,
        experts.w_in_EDF,
        experts.w_out_EHD,
        weights_TK.to(x_TD.dtype),
        layout or choose_layout(plan),
        experts.kind,
    )
