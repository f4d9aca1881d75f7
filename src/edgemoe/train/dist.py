"""The ``dist`` transport: one TCP connection per edge server, driven by the router without blocking.

The router listens on ``transport.host:transport.port``; every server process (a local one started by
:class:`~edgemoe.train.worker.ServerLauncher`, or one on another machine started by ``edgemoe worker``)
connects and says which server it is. Each call (a slot's orders, backward jobs, evaluation) is
written to every server's socket at once, without blocking, and the replies are collected with one
``selectors`` loop until ``transport.deadline`` wall seconds have passed on the router's clock:

- a server that has not answered by then is reported :data:`~edgemoe.train.transport.LATE`; its
  requests stay queued on its own channel, are executed in order when it wakes up, and a late
  ``step`` reply is handed to the trainer in a later slot (:meth:`DistTransport.late_replies`);
- a server whose connection closes is reported ``None`` (dead); a local worker is restarted with
  backoff, a remote one reconnects by itself; on connection the router sends it the expert's weights
  and optimizer state from its latest copy (:meth:`DistTransport.state_dict` or a checkpoint);
- a server the trainer took offline (:meth:`DistTransport.detach`) has its replies discarded and its
  queue drained; once it answers again it is listed by :meth:`DistTransport.back` and rejoins
  when the trainer calls :meth:`DistTransport.attach`.

No collective library is involved, so one stalled or dead peer never raises on, or slows, the others.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from edgemoe.errors import EdgeMoEError
from edgemoe.train.frames import frame, read_frames
from edgemoe.train.server import ServerSpec
from edgemoe.train.transport import LATE, TRANSPORTS, ServerOrder, ServerReply, Transport, without_queue
from edgemoe.train.worker import ServerLauncher

if TYPE_CHECKING:
    from edgemoe.train.config import TransportConfig


class TransportError(EdgeMoEError):
    """The servers could not be reached at start-up (names the missing ones and the fix)."""


class StartupInterrupted(TransportError):
    """A stop was requested (Ctrl-C, SIGTERM) while the router waited for its servers."""


def under_torchrun() -> bool:
    """True when launched by ``torchrun`` (rank and world size come from the environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def torchrun_address(cfg: TransportConfig) -> tuple[str, int]:
    """Under torchrun the router listens on MASTER_ADDR, port ``transport.port`` or MASTER_PORT + 1."""
    port = cfg.port or int(os.environ.get("MASTER_PORT", "29500")) + 1
    return os.environ["MASTER_ADDR"], port


@dataclass
class _Request:
    seq: int
    op: str
    keep: bool  # False once the server is detached: the reply is discarded


@dataclass
class _Channel:
    """The router's end of one server's connection."""

    sock: socket.socket
    server: int | None = None
    pid: int | None = None
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)
    outstanding: deque[_Request] = field(default_factory=deque)
    alive: bool = True
    ready: bool = False  # init acknowledged


@TRANSPORTS.register("dist")
class DistTransport(Transport):
    """Router side of the ``dist`` transport. See the module docstring."""

    def __init__(
        self,
        specs: list[ServerSpec],
        cfg: TransportConfig,
        *,
        on_event: Callable[[int, str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.specs = specs
        self.cfg = cfg
        self.num_servers = len(specs)
        self.deadline = cfg.deadline
        self.on_event = on_event or (lambda j, text: print(f"server {j}: {text}", file=sys.stderr))
        self.snapshots: dict[int, dict[str, Any] | None] = {j: None for j in range(self.num_servers)}
        self.channels: dict[int, _Channel] = {}
        self.tracked: set[int] = set()
        self.late: dict[int, list[ServerReply]] = {}
        self.results: dict[int, Any] = {}
        self.waiting: dict[int, int] = {}
        self.seq = 0
        self.sel = selectors.DefaultSelector()
        torchrun = under_torchrun()
        host, port = torchrun_address(cfg) if torchrun else (cfg.host, cfg.port)
        try:  # under torchrun the servers are on other nodes: listen on every interface
            self.listener = socket.create_server(("" if torchrun else host, port), backlog=64)
        except OSError as exc:
            raise TransportError(
                f"transport.host/port: cannot listen on {host}:{port} ({exc.strerror}); "
                "pick a free port or port 0 (any)"
            ) from None
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        # local servers dial the router on loopback when it listens on every interface
        self.address = (host if host not in ("", "0.0.0.0") else "127.0.0.1", self.listener.getsockname()[1])
        local = list(range(self.num_servers)) if cfg.local_servers is None else cfg.local_servers
        if torchrun:  # every server is a torchrun rank of its own
            local = []
        self.launcher = ServerLauncher(
            self.address, list(local), give_up_s=cfg.timeout_s, on_event=self.on_event
        )
        self._wait_for(set(range(self.num_servers)), cfg.timeout_s, should_stop or (lambda: False))
        for j in range(self.num_servers):
            self.attach(j)

    # ---------------------------------------------------------------------------- connections

    def _wait_for(self, servers: set[int], timeout_s: float, should_stop: Callable[[], bool]) -> None:
        end = time.monotonic() + timeout_s
        self._pump(end, lambda: servers <= set(self.back()) or should_stop())
        missing = sorted(servers - set(self.back()))
        if missing and should_stop():
            self.close()
            raise StartupInterrupted(f"stopped while waiting for servers {missing} to connect")
        if missing:
            self.close()
            raise TransportError(
                f"servers {missing} did not connect to {self.address[0]}:{self.address[1]} within "
                f"{timeout_s:g} s (transport.timeout_s); start them with `edgemoe worker --connect "
                f"HOST:{self.address[1]} --servers ...` or check transport.local_servers"
            )

    def pid(self, j: int) -> int | None:
        """Process id of server ``j`` as it reported itself (None if not connected)."""
        ch = self.channels.get(j)
        return ch.pid if ch is not None and ch.alive else None

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(sock, selectors.EVENT_READ, _Channel(sock))

    def _send(self, ch: _Channel, op: str, arg: Any, keep: bool = True) -> int:
        self.seq += 1
        ch.outstanding.append(_Request(self.seq, op, keep))
        ch.wbuf += frame((self.seq, op, arg))
        self._flush(ch)
        return self.seq

    def _flush(self, ch: _Channel) -> None:
        if not ch.alive:
            return
        try:
            while ch.wbuf:
                sent = ch.sock.send(ch.wbuf)
                del ch.wbuf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._lost(ch, "connection lost while sending")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if ch.wbuf else 0)
        self.sel.modify(ch.sock, events, ch)

    def _lost(self, ch: _Channel, why: str) -> None:
        if not ch.alive:
            return
        ch.alive = False
        self.sel.unregister(ch.sock)
        ch.sock.close()
        if ch.server is not None and self.channels.get(ch.server) is ch:
            self.tracked.discard(ch.server)
            if not self.launcher.stopping:
                self.on_event(ch.server, f"unreachable ({why})")

    def _read(self, ch: _Channel) -> None:
        try:
            data = ch.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(ch, "connection closed")
            return
        ch.rbuf += data
        for msg in read_frames(ch.rbuf):
            self._on_message(ch, msg)

    def _on_message(self, ch: _Channel, msg: Any) -> None:
        if ch.server is None:
            _, j, pid = msg
            old = self.channels.get(j)
            if old is not None:
                self._lost(old, "replaced by a new connection")
            ch.server, ch.pid = j, pid
            self.channels[j] = ch
            state = self.snapshots.get(j)
            self._send(ch, "init", (self.specs[j], without_queue(state)), keep=False)
            return
        seq, reply = msg
        request = ch.outstanding.popleft()
        if request.seq != seq:
            raise RuntimeError(f"server {ch.server} answered request {seq}, expected {request.seq}")
        if isinstance(reply, Exception):
            raise reply
        if request.op == "init":
            ch.ready = True
            return
        if self.waiting.get(ch.server) == seq:
            self.results[ch.server] = reply
        elif request.keep and request.op == "step":
            self.late.setdefault(ch.server, []).append(reply)

    def _pump(self, until: float, done: Callable[[], bool]) -> None:
        """Run the I/O loop until ``done()`` or the monotonic time ``until``."""
        while True:
            self.launcher.tick()
            if done():
                return
            left = until - time.monotonic()
            for key, mask in self.sel.select(min(max(left, 0.0), 0.05)):
                ch = key.data
                if ch is None:
                    self._accept()
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(ch)
                if mask & selectors.EVENT_READ and ch.alive:
                    self._read(ch)
            if left <= 0:
                return

    # ------------------------------------------------------------------------------------ calls

    def _call(self, requests: dict[int, tuple[str, Any]], wait_s: float | None = None) -> dict[int, Any]:
        """Send every request at once, collect replies until the deadline; LATE / None for the rest."""
        self.results, self.waiting = {}, {}
        out: dict[int, Any] = {}
        for j, (op, arg) in requests.items():
            ch = self.channels.get(j)
            if ch is None or not ch.alive or j not in self.tracked:
                out[j] = None
                continue
            self.waiting[j] = self._send(ch, op, arg)
        end = time.monotonic() + (self.deadline if wait_s is None else wait_s)

        def done() -> bool:
            return all(j in self.results or not self.channels[j].alive for j in self.waiting)

        self._pump(end, done)
        for j in self.waiting:
            if j in self.results:
                out[j] = self.results[j]
            else:
                out[j] = None if not self.channels[j].alive else LATE
        self.results, self.waiting = {}, {}
        return out

    def step(self, orders: dict[int, ServerOrder]) -> dict[int, Any]:
        return self._call({j: ("step", o) for j, o in orders.items()})

    def backward(self, jobs: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Any]:
        return self._call({j: ("backward", job) for j, job in jobs.items()})

    def infer(self, h_ND: Tensor, servers: list[int]) -> dict[int, Any]:
        return self._call({j: ("infer", h_ND) for j in servers})

    def late_replies(self) -> dict[int, list[ServerReply]]:
        self._pump(time.monotonic(), lambda: False)
        late, self.late = self.late, {}
        return {j: r for j, r in late.items() if j in self.tracked}

    def detach(self, server: int) -> None:
        """Stop tracking ``server``: discard its pending replies, drain its queue when it answers."""
        self.tracked.discard(server)
        self.late.pop(server, None)
        ch = self.channels.get(server)
        if ch is not None and ch.alive:
            for request in ch.outstanding:
                request.keep = False
            self._send(ch, "reset", None, keep=False)

    def back(self) -> list[int]:
        self._pump(time.monotonic(), lambda: False)
        return [
            j
            for j, ch in self.channels.items()
            if j not in self.tracked and ch.alive and ch.ready and not ch.outstanding
        ]

    def attach(self, server: int) -> None:
        self.tracked.add(server)

    def kill(self, server: int) -> None:
        """Fault injection: SIGKILL a local worker, or ask a remote one to exit hard."""
        if self.launcher.pid(server) is not None:
            self.launcher.kill(server)
        elif (ch := self.channels.get(server)) is not None and ch.alive:
            self._send(ch, "die", None, keep=False)
        ch = self.channels.get(server)
        if ch is not None:
            self._lost(ch, "killed by the fault schedule")
        self.tracked.discard(server)

    def profile(self, tokens: int, repeats: int) -> dict[int, dict[str, float] | None]:
        out = self._call(
            {j: ("profile", (tokens, repeats)) for j in range(self.num_servers)}, self.cfg.timeout_s
        )
        return {j: (None if v is LATE else v) for j, v in out.items()}

    def state_dict(self) -> dict[int, dict[str, Any] | None]:
        got = self._call({j: ("state", None) for j in self.tracked}, self.cfg.timeout_s)
        for j, state in got.items():
            if state is not None and state is not LATE:
                self.snapshots[j] = state
        return {j: self.snapshots[j] for j in range(self.num_servers)}

    def load_state_dict(self, states: dict[int, dict[str, Any] | None]) -> None:
        for j, state in states.items():
            if state is not None:
                self.snapshots[j] = state
        self._call({j: ("load", s) for j, s in states.items() if s is not None}, self.cfg.timeout_s)

    def close(self) -> None:
        """Tell every connected server to stop, wait briefly, release the port."""
        if self.listener.fileno() < 0:
            return
        self.launcher.stopping = True
        self.tracked = {j for j, ch in self.channels.items() if ch.alive}
        self._call({j: ("stop", None) for j in self.tracked}, 1.0)
        self.launcher.close(timeout_s=0.5)  # acknowledged the stop: only interpreter teardown is left
        for ch in list(self.channels.values()):
            self._lost(ch, "router closed")
        self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()
