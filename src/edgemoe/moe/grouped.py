"""The ``sorted`` backend's kernel: grouped expert GEMMs + combine with a hand-written backward.

Forward on the expert-sorted buffer ``xs_ND`` (expert e owns a contiguous row range, no padding):
``h = xs W_in[e]`` (one GEMM, gate|up fused), ``a = act(h)``, ``y = a W_out[e]``,
``out[t] += w_n · y_n``. Backward reuses the saved ``xs``, ``h``, ``a``, ``y`` so nothing is
recomputed, writes every per-expert GEMM result straight into its slice of one preallocated
buffer, and folds the combine weights into the output gradient once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgemoe.moe.dispatch import SortedPlan
from edgemoe.moe.experts import GroupedExperts


def _ranges(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` of every non-empty expert slice."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def _grouped_mm(
    a_NK: Tensor, w_EKM: Tensor, ranges: list[tuple[int, int, int]], *, transpose_w: bool
) -> Tensor:
    """Row block ``[s:t]`` of ``a`` times ``w[e]`` (or ``w[e]ᵀ``), written into one ``[N, M]`` buffer."""
    width = w_EKM.shape[1] if transpose_w else w_EKM.shape[2]
    out_NM = a_NK.new_empty(a_NK.shape[0], width)
    for e, s, t in ranges:
        w = w_EKM[e].t() if transpose_w else w_EKM[e]
        torch.mm(a_NK[s:t], w, out=out_NM[s:t])
    return out_NM


def _grouped_wgrad(a_NK: Tensor, g_NM: Tensor, ranges: list[tuple[int, int, int]], shape) -> Tensor:
    """Per-expert weight gradient ``a[s:t]ᵀ g[s:t]``; experts with no tokens get zeros."""
    out = a_NK.new_zeros(shape) if len(ranges) < shape[0] else a_NK.new_empty(shape)
    for e, s, t in ranges:
        torch.mm(a_NK[s:t].t(), g_NM[s:t], out=out[e])
    return out


def _swiglu_fwd(h_NF: Tensor) -> Tensor:
    gate_NH, up_NH = h_NF.chunk(2, dim=-1)
    return F.silu(gate_NH) * up_NH


def _swiglu_bwd(da_NH: Tensor, h_NF: Tensor) -> Tensor:
    gate_NH, up_NH = h_NF.chunk(2, dim=-1)
    dh_NF = torch.empty_like(h_NF)
    dgate_NH, dup_NH = dh_NF.chunk(2, dim=-1)
    torch.mul(da_NH, F.silu(gate_NH), out=dup_NH)
    dgate_NH.copy_(torch.ops.aten.silu_backward(da_NH * up_NH, gate_NH))
    return dh_NF


class _GroupedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_EDF, w_out_EHD, weights_N, token_ids_N, counts, kind):
        ranges = _ranges(counts)
        xs_ND = x_TD.index_select(0, token_ids_N)
        h_NF = _grouped_mm(xs_ND, w_in_EDF, ranges, transpose_w=False)
        a_NH = _swiglu_fwd(h_NF) if kind == "swiglu" else F.gelu(h_NF)
        y_ND = _grouped_mm(a_NH, w_out_EHD, ranges, transpose_w=False)
        out_TD = x_TD.new_zeros(x_TD.shape)
        out_TD.index_add_(0, token_ids_N, y_ND * weights_N.unsqueeze(-1))
        ctx.save_for_backward(xs_ND, h_NF, a_NH, y_ND, w_in_EDF, w_out_EHD, weights_N, token_ids_N)
        ctx.ranges, ctx.kind, ctx.num_tokens = ranges, kind, x_TD.shape[0]
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        xs_ND, h_NF, a_NH, y_ND, w_in_EDF, w_out_EHD, weights_N, token_ids_N = ctx.saved_tensors
        ranges = ctx.ranges
        gy_ND = grad_TD.index_select(0, token_ids_N)
        grad_w_N = (gy_ND * y_ND).sum(-1) if ctx.needs_input_grad[3] else None
        gy_ND.mul_(weights_N.unsqueeze(-1))
        grad_w_out = _grouped_wgrad(a_NH, gy_ND, ranges, w_out_EHD.shape) if ctx.needs_input_grad[2] else None
        da_NH = _grouped_mm(gy_ND, w_out_EHD, ranges, transpose_w=True)
        if ctx.kind == "swiglu":
            dh_NF = _swiglu_bwd(da_NH, h_NF)
        else:
            dh_NF = torch.ops.aten.gelu_backward(da_NH, h_NF)
        grad_w_in = _grouped_wgrad(xs_ND, dh_NF, ranges, w_in_EDF.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxs_ND = _grouped_mm(dh_NF, w_in_EDF, ranges, transpose_w=True)
            grad_x = grad_TD.new_zeros(ctx.num_tokens, xs_ND.shape[1]).index_add_(0, token_ids_N, dxs_ND)
        return grad_x, grad_w_in, grad_w_out, grad_w_N, None, None, None


def grouped_experts_combine(experts: GroupedExperts, x_TD: Tensor, plan: SortedPlan) -> Tensor:
    """``out[t] = Σ_n w_n · expert_{e_n}(x_t)`` over the sorted assignments of ``plan``."""
    return _GroupedExpertsCombine.apply(
        x_TD,
        experts.w_in_EDF,
        experts.w_out_EHD,
        plan.weights_N.to(x_TD.dtype),
        plan.token_ids_N,
        plan.counts,
        experts.kind,
    )
