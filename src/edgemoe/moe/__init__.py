"""edgemoe.moe: a PyTorch MoE layer with pluggable routers and expert execution backends.

Pure PyTorch; knows nothing about networks or queues. The router contract is documented in
docs/moe.md and in :mod:`edgemoe.moe.routing`.
"""

from edgemoe.moe.backends import ExpertBackend, available_backends, get_backend, register_backend
from edgemoe.moe.config import MoEConfig, RouterConfig
from edgemoe.moe.dispatch import SortedPlan, combine, sort_by_expert
from edgemoe.moe.experts import GroupedExperts
from edgemoe.moe.layer import MoELayer
from edgemoe.moe.losses import load_balance_loss, router_entropy, z_loss
from edgemoe.moe.router import (
    ExpertChoiceRouter,
    LinearGateRouter,
    Router,
    TopKRouter,
    available_routers,
    build_router,
    register_router,
)
from edgemoe.moe.routing import (
    Routing,
    RoutingStats,
    apply_capacity,
    combine_weights,
    make_routing,
    rank_within_expert,
    token_choice_capacity,
)

__all__ = [
    "ExpertBackend",
    "ExpertChoiceRouter",
    "GroupedExperts",
    "LinearGateRouter",
    "MoEConfig",
    "MoELayer",
    "Router",
    "RouterConfig",
    "Routing",
    "RoutingStats",
    "SortedPlan",
    "TopKRouter",
    "apply_capacity",
    "available_backends",
    "available_routers",
    "build_router",
    "combine",
    "combine_weights",
    "get_backend",
    "load_balance_loss",
    "make_routing",
    "rank_within_expert",
    "register_backend",
    "register_router",
    "router_entropy",
    "sort_by_expert",
    "token_choice_capacity",
    "z_loss",
]
