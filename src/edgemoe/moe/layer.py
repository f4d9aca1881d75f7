"""``MoELayer`` = router -> dispatcher -> experts -> combine (the dispatcher lives in the backend)."""

from __future__ import annotations

from torch import Tensor, nn

from edgemoe.config import require
from edgemoe.moe.backends import ExpertBackend, get_backend
from edgemoe.moe.config import MoEConfig
from edgemoe.moe.experts import GroupedExperts
from edgemoe.moe.router import build_router
from edgemoe.moe.routing import Routing


class MoELayer(nn.Module):
    """A drop-in MoE feed-forward layer.

    ``forward(x)`` takes ``[..., D]`` and returns ``(out, routing)`` with ``out`` of the same shape
    (tokens with no kept expert get zeros: add your residual outside) and the
    :class:`~edgemoe.moe.routing.Routing` carrying aux losses and telemetry. Passing
    ``expert_ids_TK`` (``[T, K]`` over the flattened tokens, ``-1`` = empty slot) routes by those
    ids instead of the router's own choice; the combine weights still come from the gate scores.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = build_router(config.router, config.dim, config.num_experts)
        self.experts = GroupedExperts(
            config.dim, config.hidden_dim, config.num_experts, config.expert, config.init_std
        )
        self.backend_name = config.backend

    def backend(self, name: str | None = None) -> ExpertBackend:
        """The execution backend (``name`` overrides the configured one for this call)."""
        return get_backend(name or self.backend_name, self.experts.w_in_EDF.device)

    def forward(
        self, x: Tensor, expert_ids_TK: Tensor | None = None, backend: str | None = None
    ) -> tuple[Tensor, Routing]:
        require(
            x.dim() >= 1 and x.shape[-1] == self.config.dim,
            "x",
            f"last dimension must be dim={self.config.dim}, got shape {tuple(x.shape)}",
        )
        x_TD = x.reshape(-1, self.config.dim)
        routing = self.router(x_TD, expert_ids_TK=expert_ids_TK)
        out_TD = self.backend(backend)(self.experts, x_TD, routing)
        return out_TD.view(x.shape), routing
