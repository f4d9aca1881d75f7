"""Per-server queue state and the slot update equations of Stable-MoE (docs/stable-moe.md).

- token backlog      Q_j(t+1) = max(Q_j(t) - S_j(t), 0) + A_j(t)
- virtual energy     Z_j(t+1) = max(Z_j(t) + E_j(t) - E_j^max, 0),  E_j = kappa_j f_j^3 tau

``online_J`` marks servers that can take work; an offline server has capacity 0 and no controller
routes to it (the training loop marks servers offline on faults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemoe.config import ConfigError, require
from edgemoe.edge.spec import NetworkSpec


@dataclass
class NetworkState:
    """Queues at the start of a slot. Backlogs are counted in tokens (real-valued: a server can be part
    way through a token), energy queues in joules."""

    backlog_J: np.ndarray
    energy_queue_J: np.ndarray
    online_J: np.ndarray
    slot: int = 0

    @classmethod
    def initial(cls, spec: NetworkSpec) -> NetworkState:
        """Empty queues, every server online."""
        J = spec.num_servers
        return cls(np.zeros(J), np.zeros(J), np.ones(J, dtype=bool))

    @property
    def num_servers(self) -> int:
        return len(self.backlog_J)

    def set_online(self, server: int, online: bool) -> None:
        """Mark a server on- or offline (e.g. on a fault); controllers never route to offline servers."""
        require(0 <= server < self.num_servers, "server", f"must be in [0, {self.num_servers}), got {server}")
        self.online_J[server] = bool(online)

    def copy(self) -> NetworkState:
        return NetworkState(
            self.backlog_J.copy(),
            self.energy_queue_J.copy(),
            self.online_J.copy(),
            self.slot,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "backlog_J": self.backlog_J.copy(),
            "energy_queue_J": self.energy_queue_J.copy(),
            "online_J": self.online_J.copy(),
            "slot": self.slot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backlog_J = np.array(state["backlog_J"], dtype=np.float64)
        self.energy_queue_J = np.array(state["energy_queue_J"], dtype=np.float64)
        self.online_J = np.array(state["online_J"], dtype=bool)
        self.slot = int(state["slot"])


@dataclass
class SlotOutcome:
    """What happened in one slot on each server."""

    served_J: np.ndarray
    arrived_J: np.ndarray
    energy_J: np.ndarray


def advance(
    state: NetworkState,
    spec: NetworkSpec,
    freq_J: np.ndarray,
    arrived_J: np.ndarray,
    served_J: np.ndarray | None = None,
) -> SlotOutcome:
    """Apply one slot's queue and energy updates to ``state`` in place.

    ``served_J`` defaults to min(Q_j, D_j(f_j)) (service happens before this slot's arrivals join);
    the training loop passes the counts its workers really computed instead. Offline servers serve
    nothing and spend no energy.
    """
    freq_J = np.where(state.online_J, freq_J, 0.0)
    arrived_J = np.asarray(arrived_J, dtype=np.float64)
    if served_J is None:
        served_J = np.minimum(state.backlog_J, spec.capacity_J(freq_J))
    else:
        served_J = np.asarray(served_J, dtype=np.float64)
        if served_J.min() < 0:
            raise ConfigError("served_J", "counts must be >= 0")
    if arrived_J.min() < 0:
        raise ConfigError("arrived_J", "counts must be >= 0")
    energy_J = spec.energy_J(freq_J)
    state.backlog_J = np.maximum(state.backlog_J - served_J, 0.0) + arrived_J
    state.energy_queue_J = np.maximum(state.energy_queue_J + energy_J - spec.budget_J, 0.0)
    state.slot += 1
    return SlotOutcome(served_J=served_J, arrived_J=arrived_J, energy_J=energy_J)
