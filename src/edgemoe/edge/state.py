"""Per-server queue state and the slot update equations of Stable-MoE (docs/stable-moe.md).

- token backlog      Q_j(t+1) = max(Q_j(t) - S_j(t), 0) + A_j(t)
- virtual energy     Z_j(t+1) = max(Z_j(t) + E_j(t) - E_j^max, 0),  E_j = kappa_j f_j^3 tau

``online_J`` marks servers that can take work; an offline server has capacity 0 and no controller
routes to it.

:class:`SlotEngine` is the one place these equations run: the simulator drives it with fluid
service, the trainer with whole tokens and the counts its servers really served, and both mark
servers offline and online through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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


Service = Literal["fluid", "whole"]


class SlotEngine:
    """Advances one network's queue, energy and on/offline state slot by slot.

    ``service='fluid'``: a server serves min(Q_j, D_j(f_j)) tokens (real-valued). ``'whole'``: it
    serves whole tokens; the fractional part of D_j carries over to the next slot while its queue is
    non-empty (and is forgotten when the queue empties or the server goes offline).

    A slot is :meth:`plan` (service counts for the chosen frequencies), then :meth:`step` (the
    updates, with the counts really served and the assignments that arrived or were dropped).
    Queued assignments moved between servers (re-routing after a fault) are applied with
    :meth:`move`: immediately between slots, after the slot's updates when inside one.
    """

    def __init__(self, spec: NetworkSpec, service: Service = "fluid"):
        require(service in ("fluid", "whole"), "service", f"must be 'fluid' or 'whole', got {service!r}")
        self.spec, self.service = spec, service
        self.state = NetworkState.initial(spec)
        self.progress_J = np.zeros(spec.num_servers)
        self.pending_J = np.zeros(spec.num_servers)
        self.in_slot = False

    @property
    def online_J(self) -> np.ndarray:
        return self.state.online_J

    def mark_offline(self, server: int) -> None:
        """Take ``server`` offline: it gets no work and no capacity until :meth:`mark_online`."""
        self.state.set_online(server, False)
        self.progress_J[server] = 0.0

    def mark_online(self, server: int) -> None:
        self.state.set_online(server, True)

    def move(self, server: int, moved_J: np.ndarray, removed: float) -> None:
        """``removed`` queued assignments leave ``server``; ``moved_J`` of them join other queues (the
        rest are dropped)."""
        delta_J = np.asarray(moved_J, dtype=np.float64).copy()
        delta_J[server] -= removed
        if self.in_slot:
            self.pending_J += delta_J
        else:
            self.state.backlog_J = np.maximum(self.state.backlog_J + delta_J, 0.0)

    def plan(self, freq_J: np.ndarray) -> np.ndarray:
        """Tokens each server serves this slot at ``freq_J`` (before this slot's arrivals join)."""
        self.in_slot = True
        online = self.state.online_J
        capacity_J = np.where(online, self.spec.capacity_J(freq_J), 0.0)
        backlog_J = self.state.backlog_J
        if self.service == "fluid":
            return np.minimum(backlog_J, capacity_J)
        self.progress_J += capacity_J
        serve_J = np.minimum(backlog_J, np.floor(self.progress_J + 1e-9))
        self.progress_J -= serve_J
        self.progress_J[(backlog_J <= serve_J) | ~online] = 0.0
        return serve_J

    def step(
        self,
        freq_J: np.ndarray,
        arrived_J: np.ndarray,
        served_J: np.ndarray | None = None,
        dropped_J: np.ndarray | None = None,
    ) -> SlotOutcome:
        """The slot's updates: ``served_J`` defaults to :meth:`plan`'s counts (planned now if the
        slot was not planned); ``dropped_J`` are assignments refused at the server (finite buffer)."""
        if served_J is None:
            served_J = self.plan(freq_J)
        outcome = advance(self.state, self.spec, freq_J, arrived_J, served_J)
        if dropped_J is not None:
            self.state.backlog_J = self.state.backlog_J - np.asarray(dropped_J, dtype=np.float64)
        self.state.backlog_J = np.maximum(self.state.backlog_J + self.pending_J, 0.0)
        self.pending_J[:] = 0.0
        self.in_slot = False
        return outcome

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.state.state_dict(), "progress_J": self.progress_J.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["network"])
        self.progress_J = np.array(state["progress_J"], dtype=np.float64)
        self.pending_J[:] = 0.0
        self.in_slot = False
