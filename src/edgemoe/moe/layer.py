"""``MoEConfig.build()`` -> ``MoELayer`` = router -> dispatcher -> experts -> combine.

The dispatcher lives in the expert executor. The layer owns its router, experts and executor; its
forward reads nothing back to the host apart from what the executor needs to size its GEMMs
(``check_finite`` adds a NaN/Inf check for debugging).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from edgemoe.config import check_positive, require
from edgemoe.errors import InputError
from edgemoe.moe.backends import EXECUTORS, ExpertExecutor, build_executor
from edgemoe.moe.config import RouterConfig, resolve_router_config
from edgemoe.moe.experts import GroupedExperts
from edgemoe.moe.routing import Routing, check_input


@dataclass
class MoEConfig:
    """One MoE layer: ``num_experts`` experts of width ``dim -> hidden_dim -> dim``.

    ``router`` is any router config (a mapping picks the router by its ``name`` key; a plain
    :class:`RouterConfig` becomes the named router's own config on construction). ``expert`` picks
    the expert MLP (``swiglu``: silu(x W_gate) * (x W_up) W_down; ``mlp``: gelu(x W_in) W_out).
    ``executor`` picks how the experts execute (``auto`` = ``sorted``). ``check_finite`` raises
    :class:`~edgemoe.errors.InputError` on NaN/Inf activations, at the cost of one host sync per
    forward: a debugging switch, off by default.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    router: RouterConfig = field(default_factory=RouterConfig)
    expert: Literal["swiglu", "mlp"] = "swiglu"
    executor: str = "auto"
    init_std: float = 0.02
    check_finite: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "num_experts"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                f"must be a positive integer, got {value!r}",
            )
        require(self.expert in ("swiglu", "mlp"), "expert", f"must be 'swiglu' or 'mlp', got {self.expert!r}")
        check_positive(self.init_std, "init_std")
        require(isinstance(self.router, (RouterConfig, Mapping)), "router", "must be a router config")
        self.router = resolve_router_config(self.router)
        self.router.check_experts(self.num_experts)
        choices = ["auto", *EXECUTORS.names()]
        require(
            self.executor in choices,
            "executor",
            f"unknown expert executor {self.executor!r}; choose one of {choices}",
        )

    def build(self) -> MoELayer:
        """The layer this config describes (fresh weights)."""
        return MoELayer(self)


class MoELayer(nn.Module):
    """A drop-in MoE feed-forward layer.

    ``forward(x)`` takes ``[..., D]`` and returns ``(out, routing)`` with ``out`` of the same shape
    (tokens with no kept expert get zeros: add your residual outside) and the
    :class:`~edgemoe.moe.routing.Routing` carrying aux losses and telemetry. Passing
    ``expert_ids_TK`` (``[T, K]`` over the flattened tokens, ``-1`` = empty slot) routes by those
    ids instead of the router's own choice; the combine weights still come from the gate scores.
    Call :meth:`step` after each optimiser step (it advances routers with a schedule, e.g. ETR).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = config.router.build(config.dim, config.num_experts)
        self.experts = GroupedExperts(
            config.dim, config.hidden_dim, config.num_experts, config.expert, config.init_std
        )
        self.executor: ExpertExecutor = build_executor(config.executor)

    def step(self) -> None:
        """Per-step bookkeeping after the optimiser step (the router's capacity schedule)."""
        self.router.step()

    def forward(
        self, x: Tensor, expert_ids_TK: Tensor | None = None, executor: ExpertExecutor | None = None
    ) -> tuple[Tensor, Routing]:
        """``executor`` overrides the layer's own for this call (e.g. a reference to compare with)."""
        check_input(
            x.dim() >= 1 and x.shape[-1] == self.config.dim,
            "x",
            f"last dimension must be dim={self.config.dim}, got shape {tuple(x.shape)}",
        )
        x_TD = x.reshape(-1, self.config.dim)
        routing = self.router(x_TD, expert_ids_TK=expert_ids_TK)
        if self.config.check_finite:
            check_finite(routing)
        out_TD = (executor or self.executor)(self.experts, x_TD, routing)
        return out_TD.view(x.shape), routing


def check_finite(routing: Routing) -> None:
    """Raise :class:`InputError` when the router logits (or scores) are not finite.

    Any NaN/Inf in a token's features reaches its logits, so checking the small ``[T, E]`` logits
    catches bad inputs at a fraction of the cost of scanning ``[T, D]``. One host sync.
    """
    gate_TE = routing.logits_TE if routing.logits_TE is not None else routing.scores_TE
    if not bool(gate_TE.isfinite().all()):
        raise InputError(
            "x", "input contains NaN or Inf (router logits are not finite); check the upstream activations"
        )
