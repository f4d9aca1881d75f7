"""Dataclass configs of the MoE layer and its routers.

``RouterConfig`` holds the fields every router understands; router-specific extras (for example
ETR's temperature or capacity schedule) go in ``options`` and are validated by that router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from edgemoe.config import ConfigError, check_positive, check_range, require


@dataclass
class RouterConfig:
    """Which router, and how it turns gate scores into expert assignments.

    ``capacity_factor`` (token-choice routers): ``> 0`` caps each expert at ceil(cf·k·T/E)
    assignments (overflow dropped by ``drop_priority``); ``0`` is dropless; ``< 0`` is dropless with
    a dynamic capacity equal to the largest expert load, but capped at ceil(|cf|·k·T/E).
    For expert choice, C = ceil(cf·T/E) tokens per expert and cf must be > 0.
    """

    name: str = "topk"
    top_k: int = 2
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    jitter: float = 0.0
    capacity_factor: float = 0.0
    drop_priority: Literal["position", "score"] = "position"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and bool(self.name), "router.name", "must be a router name")
        require(
            isinstance(self.top_k, int) and self.top_k >= 1,
            "router.top_k",
            f"must be an integer >= 1, got {self.top_k!r}",
        )
        require(
            self.score_func in ("softmax", "sigmoid"),
            "router.score_func",
            f"must be 'softmax' or 'sigmoid', got {self.score_func!r}",
        )
        check_range(self.jitter, "router.jitter", 0.0, 0.99)
        require(
            isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor),
            "router.capacity_factor",
            f"must be a finite number (> 0 capped, 0 dropless, < 0 dynamic), got {self.capacity_factor!r}",
        )
        require(
            self.drop_priority in ("position", "score"),
            "router.drop_priority",
            f"must be 'position' or 'score', got {self.drop_priority!r}",
        )


@dataclass
class MoEConfig:
    """One MoE layer: ``num_experts`` experts of width ``dim -> hidden_dim -> dim``.

    ``expert`` picks the expert MLP (``swiglu``: silu(x W_gate) * (x W_up) W_down; ``mlp``:
    gelu(x W_in) W_out). ``backend`` picks how the experts execute (``auto`` picks per device).
    """

    dim: int
    hidden_dim: int
    num_experts: int
    router: RouterConfig = field(default_factory=RouterConfig)
    expert: Literal["swiglu", "mlp"] = "swiglu"
    backend: str = "auto"
    init_std: float = 0.02

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
        if isinstance(self.router, dict):
            from edgemoe.config import from_dict

            self.router = from_dict(RouterConfig, self.router, prefix="router")
        if self.router.top_k > self.num_experts:
            raise ConfigError(
                "router.top_k",
                f"must be <= num_experts ({self.num_experts}), got {self.router.top_k}; "
                "lower top_k or add experts",
            )
        from edgemoe.moe.backends import available_backends

        choices = ["auto", *available_backends()]
        require(
            self.backend in choices,
            "backend",
            f"unknown backend {self.backend!r}; choose one of {choices}",
        )
