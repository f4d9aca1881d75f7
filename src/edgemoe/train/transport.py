"""How the router talks to the edge servers: one interface, two transports.

Per slot the router sends each live server one :class:`ServerOrder` (re-routed tokens to take first,
how many tokens to serve, this slot's new tokens to append) and gets a :class:`ServerReply` (the
served ids and their expert outputs, buffer overflow, backlog, wall time). Completed tokens then come
back to the servers as ``backward`` jobs (activations + gradient on the expert output); each server
recomputes its forward, steps its optimizer and returns the gradient on the activations.

:class:`InProcTransport` keeps every :class:`~edgemoe.train.server.ExpertServer` in this process
(simulated time). :mod:`edgemoe.train.dist` runs the same :func:`handle_order` in worker processes
reached over TCP. Both report faults the same way, through small hooks the trainer polls:

- a reply is ``None`` when the server is unreachable (dead), :data:`LATE` when it missed the
  router-side ``transport.deadline``; a late ``step`` reply is delivered later by
  :meth:`Transport.late_replies` (the trainer uses it: the tokens it served complete then);
- :meth:`Transport.detach` tells the transport the trainer took a server offline (its pending replies
  are discarded, its queue drained); :meth:`Transport.back` lists detached servers that answer again
  (a restarted one holds the router's latest copy of its expert and optimizer);
  :meth:`Transport.attach` brings one back.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from edgemoe.registry import Registry
from edgemoe.train.server import ExpertServer, ServerSpec

# name -> transport class; ``dist`` registers itself when edgemoe.train.dist is imported (on first use)
TRANSPORTS: Registry[Any] = Registry("transport", plugin_package="edgemoe.train", plugins=("dist",))


class _Late:
    """Marker reply of a server that missed the router's deadline."""

    def __repr__(self) -> str:
        return "LATE"


LATE: Any = _Late()


def _empty_ids() -> Tensor:
    return torch.empty(0, dtype=torch.int64)


@dataclass
class ServerOrder:
    """One slot's work for one server. Service happens before this slot's new tokens join the queue."""

    serve: int
    requeue_ids: Tensor = field(default_factory=_empty_ids)
    requeue_h: Tensor | None = None
    enqueue_ids: Tensor = field(default_factory=_empty_ids)
    enqueue_h: Tensor | None = None
    busy_s: float = 0.0
    stall_s: float = 0.0


@dataclass
class ServerReply:
    """What a server did with its order."""

    served_ids: Tensor
    served_y: Tensor
    overflow_ids: Tensor
    backlog: int
    wall_s: float


def handle_order(server: ExpertServer, order: ServerOrder) -> ServerReply:
    """Execute an order on a server: take re-routed tokens, serve, enqueue, emulate the frequency.

    ``busy_s`` is the wall time the service should take at the server's emulated frequency: if the
    real compute was faster, the server sleeps the difference. ``stall_s`` injects a stall (faults).
    """
    start = time.perf_counter()
    overflow = [server.enqueue(order.requeue_ids, order.requeue_h)] if order.requeue_h is not None else []
    served_ids, served_y = server.serve(order.serve)
    if order.enqueue_h is not None:
        overflow.append(server.enqueue(order.enqueue_ids, order.enqueue_h))
    remaining = order.busy_s + order.stall_s - (time.perf_counter() - start)
    if remaining > 0:
        time.sleep(remaining)
    return ServerReply(
        served_ids=served_ids,
        served_y=served_y,
        overflow_ids=torch.cat(overflow) if overflow else _empty_ids(),
        backlog=server.backlog,
        wall_s=time.perf_counter() - start,
    )


def without_queue(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A server state with an empty queue: what a restarted server gets (its tokens were re-routed)."""
    if state is None:
        return None
    return {**state, "queue_ids": state["queue_ids"][:0], "queue_h": state["queue_h"][:0]}


class Transport(ABC):
    """Router-side handle on the J servers. ``None`` in a reply: unreachable; :data:`LATE`: too late."""

    num_servers: int

    @abstractmethod
    def step(self, orders: dict[int, ServerOrder]) -> dict[int, ServerReply | None]:
        """Send every order, collect every reply."""

    @abstractmethod
    def backward(self, jobs: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor | None]:
        """``{server: (h_ND, grad_y_ND)}`` -> ``{server: grad_h_ND}`` (recompute, backprop, step)."""

    @abstractmethod
    def infer(self, h_ND: Tensor, servers: list[int]) -> dict[int, Tensor | None]:
        """Expert outputs of ``servers`` for ``h_ND`` (evaluation; queues untouched)."""

    @abstractmethod
    def kill(self, server: int) -> None:
        """Fault injection: the server dies (its process, under ``dist``)."""

    @abstractmethod
    def state_dict(self) -> dict[int, dict[str, Any] | None]:
        """Every reachable server's expert, optimizer and queue (``None`` if unreachable)."""

    @abstractmethod
    def load_state_dict(self, states: dict[int, dict[str, Any] | None]) -> None:
        """Restore servers from :meth:`state_dict` output."""

    @abstractmethod
    def profile(self, tokens: int, repeats: int) -> dict[int, dict[str, float] | None]:
        """Each server measures its own per-token expert cost (see ``ExpertServer.profile``)."""

    @abstractmethod
    def late_replies(self) -> dict[int, list[ServerReply]]:
        """``step`` replies that arrived after their deadline from servers still attached."""

    @abstractmethod
    def detach(self, server: int) -> None:
        """The trainer took ``server`` offline: discard its pending replies and drain its queue."""

    @abstractmethod
    def back(self) -> list[int]:
        """Detached servers that answer again (empty queue, latest known expert state)."""

    @abstractmethod
    def attach(self, server: int) -> None:
        """Track ``server`` again (the trainer brings it online)."""

    def close(self) -> None:  # noqa: B027 - optional hook, in-process transports hold nothing
        """Release processes and sockets (nothing to do in-process)."""


@TRANSPORTS.register("inproc")
class InProcTransport(Transport):
    """Every server in this process; time is simulated (no emulated sleeps unless asked).

    A reply slower than ``deadline`` wall seconds is reported :data:`LATE` and handed over by
    :meth:`late_replies` at the next slot (after the next ``step``), as a late reply over the
    network would be.
    """

    def __init__(self, specs: list[ServerSpec], deadline: float | None = None):
        self.servers = [ExpertServer(s) for s in specs]
        self.num_servers = len(specs)
        self.deadline = deadline
        self.tracked = set(range(self.num_servers))
        self.held: dict[int, list[ServerReply]] = {}  # late in the current slot
        self.arrived: dict[int, list[ServerReply]] = {}  # late in an earlier slot, handed over now
        self.snapshots: dict[int, dict[str, Any]] = {}

    def step(self, orders: dict[int, ServerOrder]) -> dict[int, Any]:
        for j, replies in self.held.items():
            self.arrived.setdefault(j, []).extend(replies)
        self.held = {}
        out: dict[int, Any] = {}
        for j, order in orders.items():
            reply = handle_order(self.servers[j], order)
            if self.deadline is not None and reply.wall_s > self.deadline:
                self.held.setdefault(j, []).append(reply)
                reply = LATE
            out[j] = reply
        return out

    def late_replies(self) -> dict[int, list[ServerReply]]:
        arrived, self.arrived = self.arrived, {}
        return {j: r for j, r in arrived.items() if j in self.tracked}

    def detach(self, server: int) -> None:
        self.tracked.discard(server)
        self.held.pop(server, None)
        self.arrived.pop(server, None)
        self.servers[server].drain()

    def back(self) -> list[int]:
        return [j for j in range(self.num_servers) if j not in self.tracked]

    def attach(self, server: int) -> None:
        self.tracked.add(server)

    def backward(self, jobs: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor | None]:
        return {j: self.servers[j].backward(h, g) for j, (h, g) in jobs.items()}

    def infer(self, h_ND: Tensor, servers: list[int]) -> dict[int, Tensor | None]:
        return {j: self.servers[j].infer(h_ND) for j in servers}

    def kill(self, server: int) -> None:
        """A killed server loses its queue and restarts from the router's latest copy of its state."""
        self.detach(server)
        state = without_queue(self.snapshots.get(server))
        if state is not None:
            self.servers[server].load_state_dict(state)

    def profile(self, tokens: int, repeats: int) -> dict[int, dict[str, float] | None]:
        return {j: s.profile(tokens, repeats) for j, s in enumerate(self.servers)}

    def state_dict(self) -> dict[int, dict[str, Any] | None]:
        self.snapshots = {j: s.state_dict() for j, s in enumerate(self.servers)}
        return dict(self.snapshots)

    def load_state_dict(self, states: dict[int, dict[str, Any] | None]) -> None:
        for j, state in states.items():
            if state is not None:
                self.servers[j].load_state_dict(state)
                self.snapshots[j] = state


def make_transport(
    specs: list[ServerSpec],
    cfg: Any,
    on_event: Callable[[int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Transport:
    """The transport named by ``cfg.kind`` (a :class:`~edgemoe.train.config.TransportConfig`).

    ``on_event(server, text)`` hears about deaths and restarts; ``should_stop()`` can cut short the
    wait for servers to connect (a Ctrl-C during start-up).
    """
    factory = TRANSPORTS.get(cfg.kind, field="transport.kind")
    if cfg.kind == "inproc":
        return factory(specs, cfg.deadline)
    return factory(specs, cfg, on_event=on_event, should_stop=should_stop)
