"""The server side of the ``dist`` transport: one process per edge server, and the launcher that keeps
them running.

A worker connects to the router's TCP address, says which server it is (``hello``), then executes
length-prefixed pickled requests ``(seq, op, arg)`` one at a time and answers ``(seq, reply)``. It
reconnects on its own (with backoff) whenever the connection drops, so a router restart or a network
outage never needs a human on the server's machine; the router re-sends the expert's state on every
(re)connection. :class:`ServerLauncher` starts local workers and restarts any that die, with
exponential backoff; ``edgemoe worker`` runs it on machines other than the router's.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.train.frames import LEN, frame

GAVE_UP = 3  # exit code of a server process whose router stayed unreachable: not restarted


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionError("router closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> Any:
    """Blocking read of one message (worker side)."""
    (size,) = LEN.unpack(_recv_exact(sock, LEN.size))
    return pickle.loads(_recv_exact(sock, size))


def parse_address(text: str, field_name: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a one-line error naming the flag."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(field_name, f"must look like HOST:PORT (e.g. 10.0.0.5:29500), got {text!r}")
    return host, int(port)


def parse_servers(text: str, field_name: str) -> list[int]:
    """``"0-3,6"`` -> [0, 1, 2, 3, 6]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(field_name, f"must be server indices like 0-3,6, got {text!r}") from None
    return sorted(set(out))


def _handle(server: Any, op: str, arg: Any) -> tuple[Any, Any]:
    """Execute one request; returns (new server, reply)."""
    from edgemoe.train.server import ExpertServer
    from edgemoe.train.transport import handle_order

    if op == "init":
        spec, state = arg
        server = ExpertServer(spec)
        if state is not None:
            server.load_state_dict(state)
        return server, "ok"
    if op == "step":
        return server, handle_order(server, arg)
    if op == "backward":
        return server, server.backward(*arg)
    if op == "infer":
        return server, server.infer(arg)
    if op == "reset":
        server.drain()
        return server, "ok"
    if op == "profile":
        return server, server.profile(*arg)
    if op == "state":
        return server, server.state_dict()
    if op == "load":
        server.load_state_dict(arg)
        return server, "ok"
    if op == "die":
        os._exit(1)
    return server, RuntimeError(f"unknown request {op!r}")


def serve(address: tuple[str, int], index: int, *, give_up_s: float = 60.0, parent: int | None = None) -> int:
    """Serve server ``index`` for the router at ``address``; reconnect until told to stop.

    Returns 0 after a ``stop`` request, :data:`GAVE_UP` when the router stayed unreachable for
    ``give_up_s`` seconds or the parent process (``parent``) is gone.
    """
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the router decides when servers stop
    server: Any = None
    backoff, last_seen = 0.1, time.monotonic()
    while True:
        if parent is not None and os.getppid() != parent:
            return GAVE_UP
        try:
            sock = socket.create_connection(address, timeout=5.0)
        except OSError:
            if time.monotonic() - last_seen > give_up_s:
                return GAVE_UP
            time.sleep(backoff)
            backoff = min(2 * backoff, 2.0)
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        backoff = 0.1
        try:
            sock.sendall(frame(("hello", index, os.getpid())))
            while True:
                seq, op, arg = recv_message(sock)
                last_seen = time.monotonic()
                if op == "stop":
                    sock.sendall(frame((seq, "ok")))
                    return 0
                try:
                    server, reply = _handle(server, op, arg)
                except Exception as exc:  # reported to the router, which raises it there
                    reply = RuntimeError(f"server {index} failed on {op!r}: {exc!r}")
                sock.sendall(frame((seq, reply)))
        except (OSError, ConnectionError, EOFError):
            last_seen = time.monotonic()
        finally:
            sock.close()


def worker_command(address: tuple[str, int], index: int, give_up_s: float) -> list[str]:
    host, port = address
    return [
        sys.executable,
        "-m",
        "edgemoe.train.worker",
        f"{host}:{port}",
        str(index),
        str(give_up_s),
        str(os.getpid()),
    ]


@dataclass
class _Slot:
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float = 0.0
    deaths: int = 0
    exit_code: int | None = None  # set once the process ended for good (stopped, or gave up)


class ServerLauncher:
    """Starts one worker process per local server and restarts any that exits unasked.

    Backoff: ``backoff_s * 2**n`` after the n-th consecutive quick death (capped at ``max_backoff_s``);
    a worker that stayed up ``healthy_s`` seconds resets n. ``on_event(server, text)`` is told of every
    death and restart. Workers run in their own process session, so a Ctrl-C aimed at the router's process
    group reaches only the router, which then stops them in order.
    """

    def __init__(
        self,
        address: tuple[str, int],
        servers: list[int],
        *,
        give_up_s: float = 60.0,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
        healthy_s: float = 30.0,
        on_event: Callable[[int, str], None] | None = None,
    ):
        self.address, self.give_up_s = address, give_up_s
        self.backoff_s, self.max_backoff_s, self.healthy_s = backoff_s, max_backoff_s, healthy_s
        self.on_event = on_event or (lambda j, text: print(f"server {j}: {text}", file=sys.stderr))
        self.slots = {j: _Slot() for j in servers}
        self.stopping = False
        for j in servers:
            self._start(j)

    def _start(self, j: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = worker_command(self.address, j, self.give_up_s)
        slot = self.slots[j]
        slot.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        slot.started = time.monotonic()

    def pid(self, j: int) -> int | None:
        proc = self.slots[j].proc if j in self.slots else None
        return proc.pid if proc is not None else None

    def tick(self) -> None:
        """Notice dead workers and restart those whose backoff has passed (call often)."""
        if self.stopping:
            return
        now = time.monotonic()
        for j, slot in self.slots.items():
            if slot.exit_code is not None:
                continue
            if slot.proc is not None and slot.proc.poll() is not None:
                code = slot.proc.returncode
                if code in (0, GAVE_UP):
                    slot.proc, slot.exit_code = None, code
                    if code == GAVE_UP:
                        self.on_event(j, "the router stayed unreachable; server process gave up")
                    continue
                slot.deaths = 0 if now - slot.started > self.healthy_s else slot.deaths + 1
                delay = min(self.backoff_s * 2 ** max(slot.deaths - 1, 0), self.max_backoff_s)
                slot.proc, slot.restart_at = None, now + delay
                self.on_event(j, f"process exited with code {code}; restarting in {delay:.2f} s")
            if slot.proc is None and now >= slot.restart_at:
                self._start(j)
                self.on_event(j, f"restarted (pid {self.pid(j)})")

    @property
    def finished(self) -> bool:
        """Every server process ended for good."""
        return all(slot.exit_code is not None for slot in self.slots.values())

    def kill(self, j: int) -> None:
        """SIGKILL server ``j``'s process (fault injection); :meth:`tick` restarts it."""
        proc = self.slots[j].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait for workers told to stop; kill stragglers."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for slot in self.slots.values():
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()


def run_launcher(address: tuple[str, int], servers: list[int], give_up_s: float) -> int:
    """``edgemoe worker``: keep ``servers`` running for the router at ``address`` until it is done.

    Returns 0 once the router has stopped every server, 1 if some gave up on an unreachable
    router, ``128 + signal`` on SIGINT/SIGTERM.
    """
    stop = {"sig": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    launcher = ServerLauncher(address, servers, give_up_s=give_up_s)
    while not stop["sig"] and not launcher.finished:
        launcher.tick()
        time.sleep(0.05)
    for slot in launcher.slots.values():
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.terminate()
    launcher.close()
    if stop["sig"]:
        return 128 + stop["sig"]
    return 0 if all(slot.exit_code == 0 for slot in launcher.slots.values()) else 1


if __name__ == "__main__":
    _host_port, _index, _give_up, _parent = sys.argv[1:5]
    sys.exit(
        serve(
            parse_address(_host_port, "address"), int(_index), give_up_s=float(_give_up), parent=int(_parent)
        )
    )
