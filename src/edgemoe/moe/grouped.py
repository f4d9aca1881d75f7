"""The ``sorted`` backend's kernel: grouped expert GEMMs + combine with a hand-written backward.

Forward on a row buffer holding every kept assignment once (:class:`~edgemoe.moe.dispatch.RowLayout`):
``h = xs W_in[e]`` (one GEMM, gate|up fused), ``a = act(h)``, ``y = a W_out[e]``,
``out[t] = Σ_j w_tj · y[pos_tj]`` (one fused gather-reduce). Backward reuses the saved ``xs``,
``h``, ``silu(gate)``, ``a`` and ``y`` so nothing is recomputed, folds the combine weights into
the output gradient once, and reduces the input gradient with the same gather-reduce (no
scatter-add). Every result is written with ``out=`` into storage held across steps
(:mod:`edgemoe.moe.buffers`): activation rows come from :class:`SortedBuffers`, weight gradients
from :class:`GradBuffers`.

A backward that frees the graph (the usual case) writes its intermediates over the saved buffers
once they are dead and hands them back for the next forward; a backward with ``retain_graph=True``
writes into separate buffers and leaves the saved ones intact, so the graph can be backpropagated
again.

The expert GEMMs run as batched matmuls over an ``[E, C]`` grid (padding rows are inert: their
output gradient is zero), plus, when a few experts carry much more than C rows, a second batched
matmul over a tail grid of just those experts' extra rows (with copies of their weights, whose
gradients are added back); or, when even that would pad too much, as one GEMM per expert on
padding-free slices. On CPU a batched matmul parallelises across experts and avoids one thread
barrier per expert GEMM, which outweighs a modest amount of padding; the tail grid keeps the
padding modest when the loads are skewed (small experts, few tokens). :func:`choose_layout` picks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgemoe.moe.buffers import GradBuffers, SortedBuffers
from edgemoe.moe.dispatch import RowLayout, SortedPlan, combine_rows, grid_layout, split_layout
from edgemoe.moe.experts import GroupedExperts

MAX_GRID_WASTE = 1.0
# Cost of moving one expert to the tail grid, in GEMM rows: copying its 3·D·H weights and adding
# its weight-gradient part back move ~60·D·H bytes; a row's six GEMMs are 18·D·H FLOPs, so at
# ~10 FLOPs per byte (CPU GEMM rate / memory bandwidth) an expert costs ~33 rows.
TAIL_EXPERT_ROWS = 32


def grid_capacity(counts: list[int], tail_expert_rows: int = TAIL_EXPERT_ROWS) -> tuple[int, int]:
    """``(C, rows)``: the main-grid capacity minimising ``E·C + M·(C_max − C) + cost·M`` padded rows,
    M = the experts with more than C rows (C = C_max: no tail)."""
    loads = sorted(counts, reverse=True)
    best = (len(loads) * loads[0], loads[0])
    for m in range(1, len(loads)):
        if loads[m] == loads[m - 1] or loads[m] == 0:
            continue
        rows = len(loads) * loads[m] + m * (loads[0] - loads[m] + tail_expert_rows)
        best = min(best, (rows, loads[m]))
    return best[1], best[0]


def choose_layout(plan: SortedPlan, max_grid_waste: float = MAX_GRID_WASTE) -> RowLayout:
    """Grid (+ tail) when its padded rows exceed the kept rows by at most ``max_grid_waste``.

    No kept rows at all gives the (empty) split layout: a grid's padding rows would gather token 0.
    """
    if not plan.num_rows:
        return split_layout(plan)
    capacity, rows = grid_capacity(plan.counts)
    if rows <= (1.0 + max_grid_waste) * plan.num_rows:
        return grid_layout(plan, capacity)
    return split_layout(plan)


def _tail_weights(w_EKM: Tensor, layout: RowLayout, bufs: SortedBuffers) -> Tensor | None:
    """Copies of the tail experts' weights ``[M, K, N]`` (None without a tail grid)."""
    if layout.tail is None:
        return None
    num, k, n = layout.tail.experts_M.numel(), w_EKM.shape[1], w_EKM.shape[2]
    out = bufs.take(num * k, n, w_EKM).view(num, k, n)
    return torch.index_select(w_EKM, 0, layout.tail.experts_M, out=out)


def _gemm(
    a_RK: Tensor,
    w_EKM: Tensor,
    layout: RowLayout,
    out: Tensor,
    *,
    w_tail: Tensor | None = None,
    extra_rows: int = 0,
) -> Tensor:
    """Each expert's rows of ``a`` times ``w[e]`` into ``out[:rows]``; ``extra_rows`` zero rows after.

    ``w_EKM`` (and ``w_tail``, the tail experts' weights) may be transposed views (``W[e]ᵀ``):
    the GEMMs read them with swapped strides.
    """
    rows = layout.rows
    out_RM = out[: rows + extra_rows]
    if layout.grid is not None:
        num_experts, cap = layout.grid
        end = num_experts * cap
        torch.bmm(a_RK[:end].view(num_experts, cap, -1), w_EKM, out=out_RM[:end].view(num_experts, cap, -1))
        if layout.tail is not None:
            assert w_tail is not None, "a tail grid needs the tail experts' weights"
            num, cap = w_tail.shape[0], layout.tail.capacity
            torch.bmm(a_RK[end:rows].view(num, cap, -1), w_tail, out=out_RM[end:rows].view(num, cap, -1))
    else:
        for e, s, t in layout.ranges or ():
            torch.mm(a_RK[s:t], w_EKM[e], out=out_RM[s:t])
    if extra_rows:
        out_RM[rows:].zero_()
    return out_RM


def _wgrad(a_RK: Tensor, g_RM: Tensor, layout: RowLayout, out_EKM: Tensor, bufs: SortedBuffers) -> Tensor:
    """Per-expert weight gradient ``a_eᵀ g_e`` into ``out``; experts with no rows get zeros."""
    if layout.grid is not None:
        num_experts, cap = layout.grid
        end = num_experts * cap
        a_ECK = a_RK[:end].view(num_experts, cap, -1)
        torch.bmm(a_ECK.transpose(1, 2), g_RM[:end].view(num_experts, cap, -1), out=out_EKM)
        if layout.tail is not None:
            tail = layout.tail
            num, k, m = tail.experts_M.numel(), out_EKM.shape[1], out_EKM.shape[2]
            a_MCK = a_RK[end : layout.rows].view(num, tail.capacity, -1)
            part_MKM = bufs.take(num * k, m, out_EKM).view(num, k, m)
            torch.bmm(
                a_MCK.transpose(1, 2), g_RM[end : layout.rows].view(num, tail.capacity, -1), out=part_MKM
            )
            out_EKM.index_add_(0, tail.experts_M, part_MKM)
            bufs.give(part_MKM)
        return out_EKM
    ranges = layout.ranges or []
    if len(ranges) < out_EKM.shape[0]:
        out_EKM.zero_()
    for e, s, t in ranges:
        torch.mm(a_RK[s:t].t(), g_RM[s:t], out=out_EKM[e])
    return out_EKM


def _act_forward(h_RF: Tensor, kind: str, bufs: SortedBuffers) -> tuple[Tensor, Tensor | None]:
    """``(a, silu(gate))`` for SwiGLU, ``(gelu(h), None)`` for the MLP: two passes / one pass."""
    rows, width = h_RF.shape
    if kind != "swiglu":
        return torch.ops.aten.gelu.out(h_RF, out=bufs.take(rows, width, h_RF)), None
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    s_RH = torch.ops.aten.silu.out(gate_RH, out=bufs.take(rows, width // 2, h_RF))
    return torch.mul(s_RH, up_RH, out=bufs.take(rows, width // 2, h_RF)), s_RH


def _act_backward(
    da_RH: Tensor, h_RF: Tensor, s_RH: Tensor | None, kind: str, dh_RF: Tensor, scratch_RH: Tensor | None
) -> Tensor:
    """``dh`` from ``da`` into ``dh_RF`` (which may be ``h_RF`` itself); ``da`` and ``s`` are only read.

    SwiGLU takes three passes: ``t = da·up`` (into ``scratch``), ``d_up = da·silu(gate)``,
    ``d_gate = silu'(gate)·t``; each reads its inputs before its output overwrites them.
    """
    if kind != "swiglu":
        return torch.ops.aten.gelu_backward.grad_input(da_RH, h_RF, grad_input=dh_RF)
    assert s_RH is not None and scratch_RH is not None, "SwiGLU's backward needs silu(gate) and a scratch"
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    dgate_RH, dup_RH = dh_RF.chunk(2, dim=-1)
    torch.mul(da_RH, up_RH, out=scratch_RH)
    torch.mul(da_RH, s_RH, out=dup_RH)
    torch.ops.aten.silu_backward.grad_input(scratch_RH, gate_RH, grad_input=dgate_RH)
    return dh_RF


def _forward(x_TD, w_in_EDF, w_out_EHD, weights_TK, layout: RowLayout, kind: str, bufs: SortedBuffers):
    """``(out_TD, saved)`` where ``saved`` are the buffers the backward needs (rows, tail weights)."""
    rows, dim = layout.rows, x_TD.shape[1]
    w_in_tail, w_out_tail = _tail_weights(w_in_EDF, layout, bufs), _tail_weights(w_out_EHD, layout, bufs)
    xs_RD = torch.index_select(x_TD, 0, layout.token_ids_R, out=bufs.take(rows, dim, x_TD))
    h_RF = _gemm(xs_RD, w_in_EDF, layout, bufs.take(rows, w_in_EDF.shape[2], x_TD), w_tail=w_in_tail)
    a_RH, s_RH = _act_forward(h_RF, kind, bufs)
    y_RD = _gemm(a_RH, w_out_EHD, layout, bufs.take(rows + 1, dim, x_TD), w_tail=w_out_tail, extra_rows=1)
    out_TD = combine_rows(y_RD, layout.pos_TK, weights_TK)
    return out_TD, (xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_tail, w_out_tail)


def _transposed(w: Tensor | None) -> Tensor | None:
    return None if w is None else w.transpose(1, 2)


class _GroupedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_TD, w_in_EDF, w_out_EHD, weights_TK, layout: RowLayout, kind: str, bufs, grads: GradBuffers
    ):
        out_TD, saved = _forward(x_TD, w_in_EDF, w_out_EHD, weights_TK, layout, kind, bufs)
        ctx.save_for_backward(*saved, w_in_EDF, w_out_EHD, weights_TK)
        ctx.layout, ctx.kind, ctx.bufs, ctx.grads = layout, kind, bufs, grads
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_tail, w_out_tail, w_in_EDF, w_out_EHD, weights_TK = (
            ctx.saved_tensors
        )
        layout, bufs, grads = ctx.layout, ctx.bufs, ctx.grads
        rows, dim = layout.rows, xs_RD.shape[1]
        # Overwrite the saved buffers only when autograd frees them after this backward.
        reuse_saved = not torch._C._autograd._get_current_graph_task_keep_graph()
        # One [rows + 1, D] buffer holds the output gradient rows, later the input-gradient rows.
        gy_RD = bufs.take(rows + 1, dim, y_RD)
        torch.index_select(grad_TD.contiguous(), 0, layout.token_ids_R, out=gy_RD[:rows])
        grad_w_TK = None
        if ctx.needs_input_grad[3]:
            prod_RD = torch.mul(gy_RD[:rows], y_RD[:rows], out=bufs.take(rows, dim, y_RD))
            dots_R = torch.cat([prod_RD.sum(-1), prod_RD.new_zeros(1)])
            bufs.give(prod_RD)
            grad_w_TK = dots_R.index_select(0, layout.pos_TK.reshape(-1)).view_as(weights_TK)
        w_slots = torch.cat([weights_TK.reshape(-1), weights_TK.new_zeros(1)])
        gy_RD[:rows].mul_(w_slots.index_select(0, layout.slot_ids_R).unsqueeze(-1))
        grad_w_out = None
        if ctx.needs_input_grad[2]:
            grad_w_out = _wgrad(a_RH, gy_RD[:rows], layout, grads.take("w_out", w_out_EHD), bufs)
        hidden = w_out_EHD.shape[1]
        da_RH = a_RH if reuse_saved else bufs.take(rows, hidden, a_RH)
        _gemm(gy_RD[:rows], w_out_EHD.transpose(1, 2), layout, da_RH, w_tail=_transposed(w_out_tail))
        dh_RF = h_RF if reuse_saved else bufs.take(rows, h_RF.shape[1], h_RF)
        scratch_RH = bufs.take(rows, hidden, a_RH) if s_RH is not None else None
        _act_backward(da_RH, h_RF, s_RH, ctx.kind, dh_RF, scratch_RH)
        grad_w_in = None
        if ctx.needs_input_grad[1]:
            grad_w_in = _wgrad(xs_RD, dh_RF, layout, grads.take("w_in", w_in_EDF), bufs)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxs_RD = _gemm(
                dh_RF, w_in_EDF.transpose(1, 2), layout, gy_RD, w_tail=_transposed(w_in_tail), extra_rows=1
            )
            grad_x = combine_rows(dxs_RD, layout.pos_TK)
        bufs.give(gy_RD, scratch_RH)
        if reuse_saved:
            bufs.give(xs_RD, h_RF, s_RH, a_RH, y_RD, w_in_tail, w_out_tail)
        else:
            bufs.give(da_RH, dh_RF)
        return grad_x, grad_w_in, grad_w_out, grad_w_TK, None, None, None, None


@torch.compiler.disable
def grouped_experts_combine(
    experts: GroupedExperts,
    x_TD: Tensor,
    plan: SortedPlan,
    weights_TK: Tensor,
    layout: RowLayout | None = None,
) -> Tensor:
    """``out[t] = Σ_j w_tj · expert_{e_tj}(x_t)`` over the kept slots of ``plan``.

    Runs eagerly inside ``torch.compile``d code: its GEMM sizes depend on the routing, and the
    storage it reuses across steps lives outside the graph.
    """
    if layout is None or plan.num_rows == 0:
        layout = choose_layout(plan)
    weights_TK = weights_TK.to(x_TD.dtype)
    inputs = (x_TD, experts.w_in_EDF, experts.w_out_EHD, weights_TK)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _GroupedExpertsCombine.apply(
            *inputs, layout, experts.kind, experts.row_buffers, experts.grad_buffers
        )
    out_TD, saved = _forward(*inputs, layout, experts.kind, experts.row_buffers)
    experts.row_buffers.give(*saved)
    return out_TD
