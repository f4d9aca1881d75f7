"""Routers: token features -> :class:`~edgemoe.moe.routing.Routing`, and their typed configs.

A router computes gate logits/scores (:meth:`Router.gate`) and turns them into slots
(:meth:`Router.select`). Externally decided routing (expert ids given by a controller) is a
first-class path of every router: :meth:`Router.forward` with ``expert_ids_TK`` skips ``select``
and derives the combine weights from the router's own gate scores.

A new router subclasses :class:`Router` and registers a config subclass of
:class:`~edgemoe.moe.config.RouterConfig` whose ``build`` makes it (``@ROUTERS.register("name")``);
a router named ``foo`` that is not registered yet is looked up in module ``edgemoe.moe.foo``.
Nothing in ``forward`` reads tensors back to the host.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from edgemoe.config import require
from edgemoe.moe.config import ROUTERS, RouterConfig
from edgemoe.moe.losses import load_balance_loss, z_loss
from edgemoe.moe.routing import (
    Routing,
    apply_capacity,
    check_input,
    expert_capacity,
    expert_choice,
    expert_choice_slots,
    make_routing,
)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """float32 accumulation for half precisions, the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


@ROUTERS.register("topk")
@dataclass
class TopKRouterConfig(RouterConfig):
    """Token choice: every token takes its ``top_k`` highest-scoring experts, subject to capacity."""

    name: str = field(default="topk", init=False)

    def build(self, dim: int, num_experts: int) -> TopKRouter:
        return TopKRouter(dim, num_experts, self)


@ROUTERS.register("expert_choice")
@dataclass
class ExpertChoiceRouterConfig(RouterConfig):
    """Expert choice: each expert takes its C = ceil(cf·T/E) best tokens; cf must be > 0."""

    name: str = field(default="expert_choice", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.capacity_factor > 0,
            "router.capacity_factor",
            f"expert choice needs capacity_factor > 0 (C = cf·T/E), got {self.capacity_factor}",
        )

    def build(self, dim: int, num_experts: int) -> ExpertChoiceRouter:
        return ExpertChoiceRouter(dim, num_experts, self)


class Router(nn.Module, ABC):
    """Base class: ``gate`` then ``select`` (or external ids); ``step`` after each optimiser step."""

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        require(isinstance(dim, int) and dim > 0, "dim", f"must be a positive integer, got {dim!r}")
        require(
            isinstance(num_experts, int) and num_experts > 0,
            "num_experts",
            f"must be a positive integer, got {num_experts!r}",
        )
        self.dim = dim
        self.num_experts = num_experts
        self.cfg = cfg

    @abstractmethod
    def gate(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits_TE, scores_TE)``: raw router logits and gate scores in [0, 1]."""

    @abstractmethod
    def select(self, x_TD: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Routing:
        """Choose experts for every token from the gate output."""

    def step(self) -> None:
        """Advance per-step state (e.g. a capacity schedule) once the optimiser has stepped.

        Stateless routers do nothing; called by :meth:`edgemoe.moe.MoELayer.step`.
        """

    def aux_losses(
        self, logits_TE: Tensor, scores_TE: Tensor, expert_ids_TK: Tensor, proposed_TK: Tensor
    ) -> dict[str, Tensor]:
        """Load-balance loss and router z-loss (always both; the caller weighs them)."""
        return {
            "load_balance": load_balance_loss(scores_TE, expert_ids_TK, proposed_TK),
            "z_loss": z_loss(logits_TE),
        }

    def finish(
        self,
        expert_ids_TK: Tensor,
        gate_TK: Tensor,
        kept_TK: Tensor,
        proposed_TK: Tensor,
        logits_TE: Tensor,
        scores_TE: Tensor,
        capacity: int | Tensor | None = None,
        extras: dict[str, object] | None = None,
    ) -> Routing:
        """:func:`make_routing` with this router's renormalisation and aux losses."""
        return make_routing(
            expert_ids_TK,
            gate_TK,
            kept_TK,
            scores_TE,
            renormalize=self.cfg.renormalize,
            aux_losses=self.aux_losses(logits_TE, scores_TE, expert_ids_TK, proposed_TK),
            logits_TE=logits_TE,
            proposed_TK=proposed_TK,
            capacity=capacity,
            extras=extras,
        )

    def route_external(self, expert_ids_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Routing:
        """Routing decided outside the model (e.g. the Stable-MoE controller).

        ``expert_ids_TK`` is an integer ``[T, K]`` table; ``-1`` marks an empty slot. The combine
        weights are the gate scores at those ids (renormalised over the slots if the config says
        so), so the gate keeps learning; nothing is dropped for capacity. Ids handed over on the
        host are range-checked there (no device sync); ids already on an accelerator are trusted.
        """
        num_tokens, num_experts = scores_TE.shape
        check_input(
            expert_ids_TK.dim() == 2 and expert_ids_TK.shape[0] == num_tokens,
            "expert_ids_TK",
            f"must have shape [T={num_tokens}, K], got {tuple(expert_ids_TK.shape)}",
        )
        check_input(
            not expert_ids_TK.is_floating_point() and expert_ids_TK.dtype != torch.bool,
            "expert_ids_TK",
            f"must be an integer tensor, got {expert_ids_TK.dtype}",
        )
        if expert_ids_TK.device.type == "cpu":
            bad = (expert_ids_TK < -1) | (expert_ids_TK >= num_experts)
            check_input(
                not bool(bad.any()),
                "expert_ids_TK",
                f"ids must be in [0, {num_experts}) or -1 for an empty slot",
            )
        ids = expert_ids_TK.to(device=scores_TE.device, dtype=torch.long)
        proposed_TK = ids >= 0
        ids = ids.clamp_min(0)
        gate_TK = scores_TE.gather(1, ids)
        return self.finish(
            ids, gate_TK, proposed_TK, proposed_TK, logits_TE, scores_TE, extras={"external": True}
        )

    def forward(self, x_TD: Tensor, expert_ids_TK: Tensor | None = None) -> Routing:
        check_input(
            x_TD.dim() == 2 and x_TD.shape[-1] == self.dim,
            "x",
            f"router input must be [T, {self.dim}], got {tuple(x_TD.shape)}",
        )
        logits_TE, scores_TE = self.gate(x_TD)
        if expert_ids_TK is not None:
            return self.route_external(expert_ids_TK, logits_TE, scores_TE)
        return self.select(x_TD, logits_TE, scores_TE)


class LinearGateRouter(Router):
    """A learned linear gate ``x W_g`` (no bias) with softmax or sigmoid scores and optional jitter.

    Jitter (Switch Transformer) multiplies the router input by U(1-ε, 1+ε) noise while training.
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__(dim, num_experts, cfg)
        self.proj = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(dim))

    def gate(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and self.cfg.jitter > 0:
            eps = self.cfg.jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.proj(x_TD)
        if self.cfg.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1, dtype=_acc_dtype(logits_TE)).to(logits_TE.dtype)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        return logits_TE, scores_TE


class TopKRouter(LinearGateRouter):
    """Token choice: every token takes its k highest-scoring experts, subject to capacity."""

    def __init__(self, dim: int, num_experts: int, cfg: TopKRouterConfig):
        super().__init__(dim, num_experts, cfg)
        cfg.check_experts(num_experts)

    def select(self, x_TD: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Routing:
        gate_TK, expert_ids_TK = torch.topk(scores_TE, self.cfg.top_k, dim=-1)
        proposed_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        kept_TK, capacity = apply_capacity(
            expert_ids_TK,
            gate_TK,
            proposed_TK,
            self.cfg.capacity_factor,
            self.cfg.drop_priority,
            self.num_experts,
        )
        return self.finish(expert_ids_TK, gate_TK, kept_TK, proposed_TK, logits_TE, scores_TE, capacity)


class ExpertChoiceRouter(LinearGateRouter):
    """Expert choice (Zhou et al., 2022): each expert takes its C highest-scoring tokens.

    C = ceil(cf·T/E), at most T. Slots are ``[T, E]`` with slot j meaning expert j; a token
    picked by nobody passes through with zero expert output. ``top_k`` is unused.
    """

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, expert_capacity(self.cfg.capacity_factor, num_tokens, self.num_experts))

    def select(self, x_TD: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Routing:
        cap = self.capacity(scores_TE.shape[0])
        expert_ids_TE, kept_TE = expert_choice_slots(expert_choice(scores_TE, cap))
        return self.finish(expert_ids_TE, scores_TE, kept_TE, kept_TE, logits_TE, scores_TE, cap)
