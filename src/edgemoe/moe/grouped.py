"""The ``sorted`` backend's kernel: grouped expert GEMMs + combine with a hand-written backward.

Forward on a row buffer holding every kept assignment once (:class:`~edgemoe.moe.dispatch.RowLayout`):
``h = xs W_in[e]`` (one GEMM, gate|up fused), ``a = act(h)``, ``y = a W_out[e]``,
``out[t] = Σ_j w_tj · y[pos_tj]`` (one fused gather-reduce). Backward reuses the saved ``xs``,
``h``, ``silu(gate)``, ``a`` and ``y`` so nothing is recomputed, writes every GEMM result straight
into one preallocated buffer (in backward, over saved buffers that are no longer needed), folds the
combine weights into the output gradient once, and reduces the input gradient with the same
gather-reduce (no scatter-add). Finished steps return their buffers to a :class:`Workspace` that the
next forward reuses; hence one backward per forward.

The expert GEMMs run either as one batched matmul over an ``[E, C_max]`` grid (padding rows are
inert: their output gradient is zero) or as one GEMM per expert on padding-free slices.
:func:`choose_layout` picks the grid unless padding would waste more than ``max_grid_waste``:
on CPU a single batched matmul parallelises across experts, avoiding one thread barrier per expert
GEMM, which outweighs a modest amount of padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgemoe.moe.dispatch import RowLayout, SortedPlan, combine_rows, grid_layout, split_layout
from edgemoe.moe.experts import GroupedExperts

MAX_GRID_WASTE = 1.0


class Workspace:
    """Flat buffers of finished steps, reused by the next forward of the same experts.

    A fresh multi-megabyte CPU tensor costs one page fault per 4 KiB on first touch; reusing the
    previous step's buffers (returned at the end of its backward, when nothing references them)
    avoids that. Buffers are over-allocated by 12.5 % so a slightly larger next step still fits;
    at most ``max_buffers`` are kept.
    """

    def __init__(self, max_buffers: int = 8):
        self.max_buffers = max_buffers
        self._free: list[Tensor] = []

    def take(self, rows: int, cols: int, like: Tensor) -> Tensor:
        """A contiguous ``[rows, cols]`` tensor (uninitialised)."""
        numel = rows * cols
        fits = [
            i
            for i, b in enumerate(self._free)
            if b.numel() >= numel and b.dtype == like.dtype and b.device == like.device
        ]
        if fits:
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            buf = like.new_empty(numel + numel // 8)
        return buf[:numel].view(rows, cols)

    def give(self, *tensors: Tensor | None) -> None:
        """Return buffers obtained from :meth:`take` once nothing uses them any more."""
        for t in tensors:
            if t is not None:
                self._free.append(t._base if t._base is not None else t)
        self._free.sort(key=Tensor.numel, reverse=True)
        del self._free[self.max_buffers :]


def choose_layout(plan: SortedPlan, max_grid_waste: float = MAX_GRID_WASTE) -> RowLayout:
    """Grid (batched GEMM) when ``E·C_max`` exceeds the kept rows by at most ``max_grid_waste``."""
    capacity = max(max(plan.counts, default=0), 1)
    if len(plan.counts) * capacity <= (1.0 + max_grid_waste) * max(plan.num_rows, 1):
        return grid_layout(plan, capacity)
    return split_layout(plan)


def _gemm(
    a_RK: Tensor,
    w_EKM: Tensor,
    layout: RowLayout,
    *,
    transpose_w: bool,
    extra_rows: int = 0,
    out: Tensor | None = None,
) -> Tensor:
    """Each expert's rows of ``a`` times ``w[e]`` (or ``w[e]ᵀ``) into one ``[rows + extra, M]`` buffer.

    ``extra_rows`` trailing rows are zeroed (the combine's zero row). ``out`` reuses a dead buffer
    of that shape (fresh multi-megabyte buffers cost a page fault per 4 KiB on first touch).
    """
    w = w_EKM.transpose(1, 2) if transpose_w else w_EKM
    rows = layout.rows
    out_RM = a_RK.new_empty(rows + extra_rows, w.shape[2]) if out is None else out[: rows + extra_rows]
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


def _act_forward(h_RF: Tensor, kind: str, ws: Workspace) -> tuple[Tensor, Tensor | None]:
    """``(a, silu(gate))`` for SwiGLU, ``(gelu(h), None)`` for the MLP."""
    rows, width = h_RF.shape
    if kind != "swiglu":
        return torch.ops.aten.gelu.out(h_RF, out=ws.take(rows, width, h_RF)), None
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    s_RH = torch.ops.aten.silu.out(gate_RH, out=ws.take(rows, width // 2, h_RF))
    return torch.mul(s_RH, up_RH, out=ws.take(rows, width // 2, h_RF)), s_RH


def _act_backward_(da_RH: Tensor, h_RF: Tensor, s_RH: Tensor | None, kind: str) -> Tensor:
    """``dh`` from ``da``, written over ``h`` (and ``da``/``s``): no fresh ``[R, F]`` buffer."""
    if kind != "swiglu":
        return torch.ops.aten.gelu_backward.grad_input(da_RH, h_RF, grad_input=h_RF)
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    s_RH.mul_(da_RH)  # d(up) = da * silu(gate)
    da_RH.mul_(up_RH)  # da * up
    torch.ops.aten.silu_backward.grad_input(da_RH, gate_RH, grad_input=gate_RH)
    up_RH.copy_(s_RH)
    return h_RF


class _GroupedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_EDF, w_out_EHD, weights_TK, layout: RowLayout, kind: str, ws: Workspace):
        rows, dim = layout.rows, x_TD.shape[1]
        xs_RD = torch.index_select(x_TD, 0, layout.token_ids_R, out=ws.take(rows, dim, x_TD))
        h_RF = _gemm(xs_RD, w_in_EDF, layout, transpose_w=False, out=ws.take(rows, w_in_EDF.shape[2], x_TD))
        a_RH, s_RH = _act_forward(h_RF, kind, ws)
        y_RD = _gemm(
            a_RH, w_out_EHD, layout, transpose_w=False, extra_rows=1, out=ws.take(rows + 1, dim, x_TD)
        )
        out_TD = combine_rows(y_RD, layout.pos_TK, weights_TK)
        ctx.save_for_backward(xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_EDF, w_out_EHD, weights_TK)
        ctx.layout, ctx.kind, ctx.consumed, ctx.ws = layout, kind, False, ws
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        if ctx.consumed:
            raise RuntimeError(
                "the sorted MoE backend reuses its saved buffers in backward, so it cannot backward "
                "twice through one forward (retain_graph=True); use backend='loop' for that"
            )
        ctx.consumed = True
        xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_EDF, w_out_EHD, weights_TK = ctx.saved_tensors
        layout = ctx.layout
        rows = layout.rows
        # One [rows + 1, D] buffer holds the output gradient rows, later the input-gradient rows.
        gy_RD = ctx.ws.take(rows + 1, y_RD.shape[1], y_RD)
        torch.index_select(grad_TD.contiguous(), 0, layout.token_ids_R, out=gy_RD[:rows])
        grad_w_TK = None
        if ctx.needs_input_grad[3]:
            dots_R = torch.linalg.vecdot(gy_RD[:rows], y_RD[:rows])
            dots_R = torch.cat([dots_R, dots_R.new_zeros(1)])
            grad_w_TK = dots_R.index_select(0, layout.pos_TK.reshape(-1)).view_as(weights_TK)
        w_slots = torch.cat([weights_TK.reshape(-1), weights_TK.new_zeros(1)])
        gy_RD[:rows].mul_(w_slots.index_select(0, layout.slot_ids_R).unsqueeze(-1))
        grad_w_out = _wgrad(a_RH, gy_RD[:rows], layout, w_out_EHD.shape) if ctx.needs_input_grad[2] else None
        da_RH = _gemm(gy_RD[:rows], w_out_EHD, layout, transpose_w=True, out=a_RH)
        dh_RF = _act_backward_(da_RH, h_RF, s_RH, ctx.kind)
        grad_w_in = _wgrad(xs_RD, dh_RF, layout, w_in_EDF.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxs_RD = _gemm(dh_RF, w_in_EDF, layout, transpose_w=True, extra_rows=1, out=gy_RD)
            grad_x = combine_rows(dxs_RD, layout.pos_TK)
        ctx.ws.give(xs_RD, h_RF, s_RH, a_RH, y_RD, gy_RD)
        return grad_x, grad_w_in, grad_w_out, grad_w_TK, None, None, None


def grouped_experts_combine(
    experts: GroupedExperts,
    x_TD: Tensor,
    plan: SortedPlan,
    weights_TK: Tensor,
    layout: RowLayout | None = None,
) -> Tensor:
    """``out[t] = Σ_j w_tj · expert_{e_tj}(x_t)`` over the kept slots of ``plan``."""
    return _GroupedExpertsCombine.apply(
        x_TD,
        experts.w_in_EDF,
        experts.w_out_EHD,
        weights_TK.to(x_TD.dtype),
        layout or choose_layout(plan),
        experts.kind,
        experts.workspace,
    )
