"""The ``sorted`` backend's kernel: grouped expert GEMMs + combine with a hand-written backward.

Forward on the expert-sorted buffer ``xs_ND`` (expert e owns a contiguous row range, no padding):
``h = xs W_in[e]`` (one GEMM, gate|up fused), ``a = act(h)``, ``y = a W_out[e]``,
``out[t] = Σ_j w_tj · y[pos_tj]`` (one fused gather-reduce). Backward reuses the saved ``xs``,
``h``, ``silu(gate)``, ``a`` and ``y`` so nothing is recomputed, writes every per-expert GEMM
result straight into its slice of one preallocated buffer, folds the combine weights into the
output gradient once, and reduces the input gradient with the same gather-reduce (no scatter-add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgemoe.moe.dispatch import SortedPlan, combine_rows, gather_rows
from edgemoe.moe.experts import GroupedExperts

Ranges = list[tuple[int, int, int]]


def _ranges(counts: list[int]) -> Ranges:
    """``(expert, start, stop)`` of every non-empty expert slice."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def _grouped_mm(
    a_NK: Tensor, w_EKM: Tensor, ranges: Ranges, *, transpose_w: bool, extra_rows: int = 0
) -> Tensor:
    """Rows ``[s:t]`` of ``a`` times ``w[e]`` (or ``w[e]ᵀ``), written into one ``[N + extra, M]`` buffer.

    ``extra_rows`` trailing rows are zeroed (the combine's zero row).
    """
    width = w_EKM.shape[1] if transpose_w else w_EKM.shape[2]
    rows = a_NK.shape[0]
    out_NM = a_NK.new_empty(rows + extra_rows, width)
    for e, s, t in ranges:
        w = w_EKM[e].t() if transpose_w else w_EKM[e]
        torch.mm(a_NK[s:t], w, out=out_NM[s:t])
    if extra_rows:
        out_NM[rows:].zero_()
    return out_NM


def _grouped_wgrad(a_NK: Tensor, g_NM: Tensor, ranges: Ranges, shape: torch.Size) -> Tensor:
    """Per-expert weight gradient ``a[s:t]ᵀ g[s:t]``; experts with no tokens get zeros."""
    out = a_NK.new_zeros(shape) if len(ranges) < shape[0] else a_NK.new_empty(shape)
    for e, s, t in ranges:
        torch.mm(a_NK[s:t].t(), g_NM[s:t], out=out[e])
    return out


def _act_forward(h_NF: Tensor, kind: str) -> tuple[Tensor, Tensor | None]:
    """``(a, silu(gate))`` for SwiGLU, ``(gelu(h), None)`` for the MLP."""
    if kind != "swiglu":
        return F.gelu(h_NF), None
    gate_NH, up_NH = h_NF.chunk(2, dim=-1)
    s_NH = F.silu(gate_NH)
    return s_NH * up_NH, s_NH


def _act_backward(da_NH: Tensor, h_NF: Tensor, s_NH: Tensor | None, kind: str) -> Tensor:
    """``dh`` from ``da`` (``da`` is overwritten). Three elementwise passes for SwiGLU."""
    dh_NF = torch.empty_like(h_NF)
    if kind != "swiglu":
        return torch.ops.aten.gelu_backward.grad_input(da_NH, h_NF, grad_input=dh_NF)
    gate_NH, up_NH = h_NF.chunk(2, dim=-1)
    dgate_NH, dup_NH = dh_NF.chunk(2, dim=-1)
    torch.mul(da_NH, s_NH, out=dup_NH)
    da_NH.mul_(up_NH)
    torch.ops.aten.silu_backward.grad_input(da_NH, gate_NH, grad_input=dgate_NH)
    return dh_NF


class _GroupedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_EDF, w_out_EHD, weights_TK, plan: SortedPlan, kind: str):
        ranges = _ranges(plan.counts)
        xs_ND = gather_rows(x_TD, plan)
        h_NF = _grouped_mm(xs_ND, w_in_EDF, ranges, transpose_w=False)
        a_NH, s_NH = _act_forward(h_NF, kind)
        y_RD = _grouped_mm(a_NH, w_out_EHD, ranges, transpose_w=False, extra_rows=1)
        out_TD = combine_rows(y_RD, plan, weights_TK)
        ctx.save_for_backward(xs_ND, h_NF, s_NH, a_NH, y_RD, w_in_EDF, w_out_EHD, weights_TK)
        ctx.plan, ctx.ranges, ctx.kind = plan, ranges, kind
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        xs_ND, h_NF, s_NH, a_NH, y_RD, w_in_EDF, w_out_EHD, weights_TK = ctx.saved_tensors
        plan, ranges = ctx.plan, ctx.ranges
        grad_TD = grad_TD.contiguous()
        rows = plan.num_rows
        gy_ND = gather_rows(grad_TD, plan)
        grad_w_TK = None
        if ctx.needs_input_grad[3]:
            grad_w_N = torch.linalg.vecdot(gy_ND, y_RD[:rows])
            grad_w_TK = grad_w_N.new_zeros(weights_TK.numel()).index_copy_(0, plan.order_N, grad_w_N)
            grad_w_TK = grad_w_TK.view_as(weights_TK)
        gy_ND.mul_(weights_TK.reshape(-1).index_select(0, plan.order_N).unsqueeze(-1))
        grad_w_out = _grouped_wgrad(a_NH, gy_ND, ranges, w_out_EHD.shape) if ctx.needs_input_grad[2] else None
        da_NH = _grouped_mm(gy_ND, w_out_EHD, ranges, transpose_w=True)
        dh_NF = _act_backward(da_NH, h_NF, s_NH, ctx.kind)
        grad_w_in = _grouped_wgrad(xs_ND, dh_NF, ranges, w_in_EDF.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxs_RD = _grouped_mm(dh_NF, w_in_EDF, ranges, transpose_w=True, extra_rows=1)
            grad_x = combine_rows(dxs_RD, plan)
        return grad_x, grad_w_in, grad_w_out, grad_w_TK, None, None


def grouped_experts_combine(
    experts: GroupedExperts, x_TD: Tensor, plan: SortedPlan, weights_TK: Tensor
) -> Tensor:
    """``out[t] = Σ_j w_tj · expert_{e_tj}(x_t)`` over the kept slots of ``plan``."""
    return _GroupedExpertsCombine.apply(
        x_TD, experts.w_in_EDF, experts.w_out_EHD, weights_TK.to(x_TD.dtype), plan, experts.kind
    )
