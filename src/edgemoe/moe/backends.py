"""Interchangeable expert executors behind one interface, registered in :data:`EXECUTORS`.

An executor computes ``out[t] = Σ_{kept slots (t, j)} w_tj · expert_{e_tj}(x_t)`` from the experts,
the tokens and a :class:`~edgemoe.moe.routing.Routing`:

- ``loop``: sort by expert, one reference expert forward per expert (plain autograd).
- ``padded``: scatter into an ``[E, C, D]`` grid (C = the routing's capacity, or the largest load
  when dropless) and run two batched matmuls; padding rows cost FLOPs.
- ``sorted``: dropless grouped GEMMs on the expert-sorted rows with a hand-written backward
  (:mod:`edgemoe.moe.grouped`) that saves only what the gradients need; the GEMMs run as one
  batched matmul over an ``[E, C_max]`` grid or per expert on padding-free slices, whichever
  wastes less (see :func:`edgemoe.moe.grouped.choose_layout`).

``auto`` resolves to ``sorted`` (the fastest on CPU in ``benchmarks/moe_layer.py``). The layer builds
its executor once (:func:`build_executor`) and keeps it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from edgemoe.config import ConfigError
from edgemoe.moe.dispatch import (
    combine,
    gather_rows,
    grid_layout,
    padded_positions,
    sort_by_expert,
    split_layout,
)
from edgemoe.moe.experts import GroupedExperts
from edgemoe.moe.grouped import choose_layout, grouped_experts_combine
from edgemoe.moe.routing import Routing
from edgemoe.registry import Registry

EXECUTORS: Registry[type[ExpertExecutor]] = Registry("expert executor")
"""Executor name -> class (``auto`` is not a name here: :func:`build_executor` resolves it)."""


def default_executor(device: torch.device) -> str:
    """The sensible default for ``device`` (``sorted`` on CPU and GPU alike)."""
    return "sorted"


def build_executor(name: str, device: torch.device | None = None, field: str = "executor") -> ExpertExecutor:
    """A new executor by name; ``auto`` picks :func:`default_executor`. ``field`` names the setting."""
    if name == "auto":
        name = default_executor(device or torch.device("cpu"))
    return EXECUTORS.get(name, field=field)()


class ExpertExecutor(ABC):
    """Runs the experts on routed tokens and combines their outputs."""

    @abstractmethod
    def __call__(self, experts: GroupedExperts, x_TD: Tensor, routing: Routing) -> Tensor:
        """``out_TD``: the gate-weighted sum of each token's kept experts (zero if none)."""


@EXECUTORS.register("loop")
class LoopExecutor(ExpertExecutor):
    """One reference forward per expert on its contiguous slice; the readable baseline."""

    def __call__(self, experts: GroupedExperts, x_TD: Tensor, routing: Routing) -> Tensor:
        plan = sort_by_expert(routing)
        xs_ND = gather_rows(x_TD, plan)
        parts = [
            experts.expert_forward(x_nD, e)
            for e, x_nD in enumerate(xs_ND.split(plan.counts))
            if x_nD.shape[0] > 0
        ]
        ys_ND = torch.cat(parts) if parts else xs_ND.new_zeros(0, x_TD.shape[-1])
        return combine(ys_ND, plan, routing.weights_TK)


@EXECUTORS.register("padded")
class PaddedExecutor(ExpertExecutor):
    """Fixed-shape ``[E, C, D]`` batched matmuls (the GShard/Switch layout)."""

    def __call__(self, experts: GroupedExperts, x_TD: Tensor, routing: Routing) -> Tensor:
        plan = sort_by_expert(routing)
        capacity = max(max(plan.counts, default=0), routing.capacity or 0, 1)
        num_experts, dim = experts.num_experts, x_TD.shape[-1]
        rows_N = padded_positions(plan, capacity)
        grid_RD = x_TD.new_zeros(num_experts * capacity, dim)
        grid_RD = grid_RD.index_copy(0, rows_N, gather_rows(x_TD, plan))
        h_ECF = torch.bmm(grid_RD.view(num_experts, capacity, dim), experts.w_in_EDF)
        y_ECD = torch.bmm(experts.activation(h_ECF), experts.w_out_EHD)
        return combine(y_ECD.reshape(-1, dim).index_select(0, rows_N), plan, routing.weights_TK)


@EXECUTORS.register("sorted")
class SortedExecutor(ExpertExecutor):
    """Dropless grouped GEMMs on the expert-sorted rows with a fused custom backward.

    ``strategy``: ``auto`` (batched ``[E, C_max]`` grid GEMMs unless padding would waste more than
    100 %, else per-expert GEMMs), ``grid`` or ``split`` to force one.
    """

    def __init__(self, strategy: str = "auto"):
        if strategy not in ("auto", "grid", "split"):
            raise ConfigError("strategy", f"must be 'auto', 'grid' or 'split', got {strategy!r}")
        self.strategy = strategy

    @torch.compiler.disable
    def __call__(self, experts: GroupedExperts, x_TD: Tensor, routing: Routing) -> Tensor:
        plan = sort_by_expert(routing)
        if self.strategy == "grid":
            layout = grid_layout(plan, max(max(plan.counts, default=0), 1))
        elif self.strategy == "split":
            layout = split_layout(plan)
        else:
            layout = choose_layout(plan)
        return grouped_experts_combine(experts, x_TD, plan, routing.weights_TK, layout)
