"""Per-server queue state and the slot update equations of Stable-MoE (docs/stable-moe.md).

- token backlog      Q_j(t+1) = max(Q_j(t) - S_j(t), 0) + A_j(t)
- virtual energy     Z_j(t+1) = max(Z_j(t) + E_j(t) - E_j^max, 0),  E_j = kappa_j f_j^3 tau

``online_E`` marks servers that can take work; an offline server has capacity 0 and no controller
routes to it.

:class:`SlotEngine` is the one place these equations run: the simulator drives it with fluid
service, the trainer with whole tokens and the counts its servers really served, and both mark
servers offline and online through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgemoe.config import require
from edgemoe.edge.spec import NetworkSpec
from edgemoe.errors import InputError


@dataclass
class NetworkState:
    """Queues at the start of a slot. Backlogs are counted in tokens (real-valued: a server can be part
    way through a token), energy queues in joules."""

    backlog_E: np.ndarray
    energy_queue_E: np.ndarray
    online_E: np.ndarray
    slot: int = 0

    @classmethod
    def initial(cls, spec: NetworkSpec) -> NetworkState:
        """Empty queues, every server online."""
        J = spec.num_servers
        return cls(np.zeros(J), np.zeros(J), np.ones(J, dtype=bool))

    @property
    def num_servers(self) -> int:
        return len(self.backlog_E)

    def set_online(self, server: int, online: bool) -> None:
        """Mark a server on- or offline (e.g. on a fault); controllers never route to offline servers."""
        require(0 <= server < self.num_servers, "server", f"must be in [0, {self.num_servers}), got {server}")
        self.online_E[server] = bool(online)

    def copy(self) -> NetworkState:
        return NetworkState(
            self.backlog_E.copy(),
            self.energy_queue_E.copy(),
            self.online_E.copy(),
            self.slot,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "backlog_E": self.backlog_E.copy(),
            "energy_queue_E": self.energy_queue_E.copy(),
            "online_E": self.online_E.copy(),
            "slot": self.slot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backlog_E = np.array(state["backlog_E"], dtype=np.float64)
        self.energy_queue_E = np.array(state["energy_queue_E"], dtype=np.float64)
        self.online_E = np.array(state["online_E"], dtype=bool)
        self.slot = int(state["slot"])


@dataclass
class SlotOutcome:
    """What happened in one slot on each server."""

    served_E: np.ndarray
    arrived_E: np.ndarray
    energy_E: np.ndarray


def advance(
    state: NetworkState,
    spec: NetworkSpec,
    freq_E: np.ndarray,
    arrived_E: np.ndarray,
    served_E: np.ndarray | None = None,
) -> SlotOutcome:
    """Apply one slot's queue and energy updates to ``state`` in place.

    ``served_E`` defaults to min(Q_j, D_j(f_j)) (service happens before this slot's arrivals join);
    the training loop passes the counts its workers really computed instead. Offline servers serve
    nothing and spend no energy.
    """
    freq_E = np.where(state.online_E, freq_E, 0.0)
    arrived_E = np.asarray(arrived_E, dtype=np.float64)
    if served_E is None:
        served_E = np.minimum(state.backlog_E, spec.capacity_E(freq_E))
    else:
        served_E = np.asarray(served_E, dtype=np.float64)
        if served_E.min() < 0:
            raise InputError("served_E", "counts must be >= 0")
    if arrived_E.min() < 0:
        raise InputError("arrived_E", "counts must be >= 0")
    energy_E = spec.energy_E(freq_E)
    state.backlog_E = np.maximum(state.backlog_E - served_E, 0.0) + arrived_E
    state.energy_queue_E = np.maximum(state.energy_queue_E + energy_E - spec.budget_E, 0.0)
    state.slot += 1
    return SlotOutcome(served_E=served_E, arrived_E=arrived_E, energy_E=energy_E)


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
        self.progress_E = np.zeros(spec.num_servers)
        self.pending_E = np.zeros(spec.num_servers)
        self.in_slot = False

    @property
    def online_E(self) -> np.ndarray:
        return self.state.online_E

    def mark_offline(self, server: int) -> None:
        """Take ``server`` offline: it gets no work and no capacity until :meth:`mark_online`."""
        self.state.set_online(server, False)
        self.progress_E[server] = 0.0

    def mark_online(self, server: int) -> None:
        self.state.set_online(server, True)

    def move(self, server: int, moved_E: np.ndarray, removed: float) -> None:
        """``removed`` queued assignments leave ``server``; ``moved_E`` of them join other queues (the
        rest are dropped)."""
        delta_E = np.asarray(moved_E, dtype=np.float64).copy()
        delta_E[server] -= removed
        if self.in_slot:
            self.pending_E += delta_E
        else:
            self.state.backlog_E = np.maximum(self.state.backlog_E + delta_E, 0.0)

    def plan(self, freq_E: np.ndarray) -> np.ndarray:
        """Tokens each server serves this slot at ``freq_E`` (before this slot's arrivals join)."""
        self.in_slot = True
        online = self.state.online_E
        capacity_E = np.where(online, self.spec.capacity_E(freq_E), 0.0)
        backlog_E = self.state.backlog_E
        if self.service == "fluid":
            return np.minimum(backlog_E, capacity_E)
        self.progress_E += capacity_E
        serve_E = np.minimum(backlog_E, np.floor(self.progress_E + 1e-9))
        self.progress_E -= serve_E
        self.progress_E[(backlog_E <= serve_E) | ~online] = 0.0
        return serve_E

    def step(
        self,
        freq_E: np.ndarray,
        arrived_E: np.ndarray,
        served_E: np.ndarray | None = None,
        dropped_E: np.ndarray | None = None,
    ) -> SlotOutcome:
        """The slot's updates: ``served_E`` defaults to :meth:`plan`'s counts (planned now if the
        slot was not planned); ``dropped_E`` are assignments refused at the server (finite buffer)."""
        if served_E is None:
            served_E = self.plan(freq_E)
        outcome = advance(self.state, self.spec, freq_E, arrived_E, served_E)
        if dropped_E is not None:
            self.state.backlog_E = self.state.backlog_E - np.asarray(dropped_E, dtype=np.float64)
        self.state.backlog_E = np.maximum(self.state.backlog_E + self.pending_E, 0.0)
        self.pending_E[:] = 0.0
        self.in_slot = False
        return outcome

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.state.state_dict(), "progress_E": self.progress_E.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["network"])
        self.progress_E = np.array(state["progress_E"], dtype=np.float64)
        self.pending_E[:] = 0.0
        self.in_slot = False
