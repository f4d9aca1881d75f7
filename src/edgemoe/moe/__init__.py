"""edgemoe.moe: a PyTorch MoE layer with pluggable routers and expert executors.

Pure PyTorch; knows nothing about networks or queues. Components are built the same way: a typed
config dataclass with ``build()`` (``MoEConfig(...).build()``, ``TopKRouterConfig(...).build(dim,
E)``), and pluggable ones are looked up by name in one registry each (:data:`ROUTERS`,
:data:`EXECUTORS`). The router contract is documented in docs/moe.md and in
:mod:`edgemoe.moe.routing`.
"""

from edgemoe.moe.backends import EXECUTORS, ExpertExecutor, build_executor
from edgemoe.moe.config import ROUTERS, RouterConfig, resolve_router_config
from edgemoe.moe.dispatch import SortedPlan, combine, sort_by_expert
from edgemoe.moe.etr import ETRRouter, ETRRouterConfig
from edgemoe.moe.experts import GroupedExperts
from edgemoe.moe.layer import MoEConfig, MoELayer
from edgemoe.moe.losses import load_balance_loss, router_entropy, z_loss
from edgemoe.moe.router import (
    ExpertChoiceRouter,
    ExpertChoiceRouterConfig,
    LinearGateRouter,
    Router,
    TopKRouter,
    TopKRouterConfig,
)
from edgemoe.moe.routing import (
    Routing,
    RoutingStats,
    apply_capacity,
    combine_weights,
    expert_capacity,
    expert_choice,
    make_routing,
    rank_within_expert,
)

__all__ = [
    "EXECUTORS",
    "ETRRouter",
    "ETRRouterConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "ExpertExecutor",
    "GroupedExperts",
    "LinearGateRouter",
    "MoEConfig",
    "MoELayer",
    "ROUTERS",
    "Router",
    "RouterConfig",
    "Routing",
    "RoutingStats",
    "SortedPlan",
    "TopKRouter",
    "TopKRouterConfig",
    "apply_capacity",
    "build_executor",
    "combine",
    "combine_weights",
    "expert_capacity",
    "expert_choice",
    "load_balance_loss",
    "make_routing",
    "rank_within_expert",
    "resolve_router_config",
    "router_entropy",
    "sort_by_expert",
    "z_loss",
]
