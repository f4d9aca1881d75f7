"""Routers: token features -> :class:`~edgemoe.moe.routing.Routing`, plus a name registry.

A router computes gate logits/scores (:meth:`Router.gate`) and turns them into slots
(:meth:`Router.select`). Externally decided routing (expert ids given by a controller) is a
first-class path of every router: :meth:`Router.forward` with ``expert_ids_TK`` skips ``select``
and derives the combine weights from the router's own gate scores.

New routers subclass :class:`Router` and register with ``@register_router("name")``; a router named
``foo`` that is not registered yet is looked up in module ``edgemoe.moe.foo`` on first use.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from edgemoe.config import ConfigError, require
from edgemoe.moe.config import RouterConfig
from edgemoe.moe.losses import load_balance_loss, z_loss
from edgemoe.moe.routing import Routing, apply_capacity, make_routing

_ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator adding a :class:`Router` subclass to the registry under ``name``."""

    def deco(cls: type[Router]) -> type[Router]:
        existing = _ROUTERS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"router name {name!r} is already registered by {existing.__qualname__}")
        _ROUTERS[name] = cls
        cls.registered_name = name
        return cls

    return deco


def available_routers() -> list[str]:
    """Names registered so far (built-ins always; plug-in modules once imported)."""
    return sorted(_ROUTERS)


def get_router_class(name: str) -> type[Router]:
    """Registry lookup; imports ``edgemoe.moe.<name>`` once if the name is not registered yet."""
    if name not in _ROUTERS and name.isidentifier():
        module = f"edgemoe.moe.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in _ROUTERS:
        raise ConfigError("router.name", f"unknown router {name!r}; choose one of {available_routers()}")
    return _ROUTERS[name]


def build_router(cfg: RouterConfig | str, dim: int, num_experts: int) -> Router:
    """Instantiate the router named by ``cfg.name`` (a bare name uses default settings)."""
    if isinstance(cfg, str):
        cfg = RouterConfig(name=cfg)
    return get_router_class(cfg.name)(dim, num_experts, cfg)


def check_finite(logits_TE: Tensor, field: str = "x") -> None:
    """Raise a clear error when the router logits are not finite.

    Any NaN/Inf in a token's features reaches its logits, so checking the small ``[T, E]`` logits
    catches bad inputs at a fraction of the cost of scanning ``[T, D]``.
    """
    if not bool(torch.isfinite(logits_TE).all()):
        raise ConfigError(
            field, "input contains NaN or Inf (router logits are not finite); check the upstream activations"
        )


def _acc_dtype(t: Tensor) -> torch.dtype:
    """float32 accumulation for half precisions, the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class Router(nn.Module, ABC):
    """Base class: ``gate`` then ``select`` (or external ids). Subclasses set ``registered_name``."""

    registered_name = ""

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
        capacity: int | None = None,
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
        so), so the gate keeps learning; nothing is dropped for capacity.
        """
        num_tokens, num_experts = scores_TE.shape
        require(
            expert_ids_TK.dim() == 2 and expert_ids_TK.shape[0] == num_tokens,
            "expert_ids_TK",
            f"must have shape [T={num_tokens}, K], got {tuple(expert_ids_TK.shape)}",
        )
        require(
            not expert_ids_TK.is_floating_point() and expert_ids_TK.dtype != torch.bool,
            "expert_ids_TK",
            f"must be an integer tensor, got {expert_ids_TK.dtype}",
        )
        ids = expert_ids_TK.to(device=scores_TE.device, dtype=torch.long)
        bad = (ids < -1) | (ids >= num_experts)
        require(
            not bool(bad.any()), "expert_ids_TK", f"ids must be in [0, {num_experts}) or -1 for an empty slot"
        )
        proposed_TK = ids >= 0
        ids = ids.clamp_min(0)
        gate_TK = scores_TE.gather(1, ids)
        return self.finish(
            ids, gate_TK, proposed_TK, proposed_TK, logits_TE, scores_TE, extras={"external": True}
        )

    def forward(self, x_TD: Tensor, expert_ids_TK: Tensor | None = None) -> Routing:
        require(
            x_TD.dim() == 2 and x_TD.shape[-1] == self.dim,
            "x",
            f"router input must be [T, {self.dim}], got {tuple(x_TD.shape)}",
        )
        logits_TE, scores_TE = self.gate(x_TD)
        check_finite(logits_TE)
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


@register_router("topk")
class TopKRouter(LinearGateRouter):
    """Token choice: every token takes its k highest-scoring experts, subject to capacity."""

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__(dim, num_experts, cfg)
        require(
            cfg.top_k <= num_experts,
            "router.top_k",
            f"must be <= num_experts ({num_experts}), got {cfg.top_k}; lower top_k or add experts",
        )

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


@register_router("expert_choice")
class ExpertChoiceRouter(LinearGateRouter):
    """Expert choice (Zhou et al., 2022): each expert takes its C highest-scoring tokens.

    C = ceil(cf·T/E), at most T. Slots are ``[T, E]`` with slot j meaning expert j; a token
    picked by nobody passes through with zero expert output. ``top_k`` is unused.
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__(dim, num_experts, cfg)
        require(
            cfg.capacity_factor > 0,
            "router.capacity_factor",
            f"expert choice needs capacity_factor > 0 (C = cf·T/E), got {cfg.capacity_factor}",
        )

    def capacity(self, num_tokens: int) -> int:
        return max(1, min(num_tokens, math.ceil(self.cfg.capacity_factor * num_tokens / self.num_experts)))

    def select(self, x_TD: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Routing:
        num_tokens = scores_TE.shape[0]
        cap = self.capacity(num_tokens)
        _, token_ids_EC = torch.topk(scores_TE.detach().t(), cap, dim=-1)
        kept_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
        expert_idx_EC = torch.arange(self.num_experts, device=scores_TE.device)[:, None].expand_as(
            token_ids_EC
        )
        kept_TE[token_ids_EC, expert_idx_EC] = True
        expert_ids_TE = torch.arange(self.num_experts, device=scores_TE.device).expand(num_tokens, -1)
        return self.finish(expert_ids_TE.contiguous(), scores_TE, kept_TE, kept_TE, logits_TE, scores_TE, cap)
