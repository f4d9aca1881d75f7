"""The ``dist`` transport: torch.distributed (gloo on CPU, nccl on GPU), rank 0 the router, rank j+1
the server hosting expert j.

Each worker runs :func:`worker_loop`: it receives pickled requests from rank 0 over point-to-point
send/recv, executes them on its :class:`~edgemoe.train.server.ExpertServer` with the same
:func:`~edgemoe.train.transport.handle_order` the in-process transport uses, and replies. Locally,
``DistTransport`` starts the J workers as ``python -m edgemoe.train.dist`` processes on 127.0.0.1; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set)
it joins the existing group and rank 0 is the router. A worker that dies (connection closed) or
times out is reported as ``None`` and never contacted again; the trainer marks it offline.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from edgemoe.train.config import TransportConfig
from edgemoe.train.server import ExpertServer, ServerSpec
from edgemoe.train.transport import ServerOrder, ServerReply, Transport, handle_order


def send_obj(obj: Any, dst: int) -> None:
    """Pickle ``obj`` and send it to rank ``dst`` (length first, then bytes)."""
    payload = torch.frombuffer(
        bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
    )
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst)
    dist.send(payload, dst)


def recv_obj(src: int) -> Any:
    """Receive an object sent by :func:`send_obj` from rank ``src``."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, src)
    return pickle.loads(payload.numpy().tobytes())


def under_torchrun() -> bool:
    """True when launched by ``torchrun`` (the process group comes from the environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _init_group(
    backend: str, rank: int, world: int, timeout_s: float, addr: str | None, port: int | None
) -> None:
    if addr is not None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def worker_loop() -> None:
    """Serve requests from rank 0 until told to stop (or the router goes away)."""
    torch.set_num_threads(1)
    server: ExpertServer | None = None
    while True:
        try:
            op, arg = recv_obj(0)
        except RuntimeError:
            return
        if op == "stop":
            send_obj("ok", 0)
            return
        if op == "init":
            server = ExpertServer(arg)
            reply: Any = "ok"
        elif op == "step":
            reply = handle_order(server, arg)
        elif op == "backward":
            reply = server.backward(*arg)
        elif op == "infer":
            reply = server.infer(arg)
        elif op == "reset":
            server.drain()
            reply = "ok"
        elif op == "profile":
            reply = server.profile(*arg)
        elif op == "state":
            reply = server.state_dict()
        elif op == "load":
            server.load_state_dict(arg)
            reply = "ok"
        elif op == "die":
            os._exit(1)
        else:
            reply = RuntimeError(f"unknown request {op!r}")
        send_obj(reply, 0)


def worker_main(backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Entry point of a server process: join the group from the environment, serve, leave."""
    _init_group(backend, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timeout_s, None, None)
    worker_loop()
    # No destroy_process_group(): with dead peers it can block; exiting closes the sockets.
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DistTransport(Transport):
    """Router side of the ``dist`` transport (rank 0)."""

    def __init__(self, specs: list[ServerSpec], cfg: TransportConfig):
        self.num_servers = len(specs)
        self.dead: set[int] = set()
        self.procs: list[Any] = []
        world = self.num_servers + 1
        if under_torchrun():
            if int(os.environ["WORLD_SIZE"]) != world or int(os.environ["RANK"]) != 0:
                raise RuntimeError(
                    f"torchrun must start J+1={world} processes (got WORLD_SIZE={os.environ['WORLD_SIZE']}); "
                    "rank 0 is the router, ranks 1..J the servers"
                )
            _init_group(cfg.backend, 0, world, cfg.timeout_s, None, None)
        else:
            port = cfg.port or free_port()
            for rank in range(1, world):
                env = dict(
                    os.environ,
                    RANK=str(rank),
                    WORLD_SIZE=str(world),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    OMP_NUM_THREADS="1",
                )
                cmd = [sys.executable, "-m", "edgemoe.train.dist", cfg.backend, str(cfg.timeout_s)]
                self.procs.append(subprocess.Popen(cmd, env=env))
            _init_group(cfg.backend, 0, world, cfg.timeout_s, "127.0.0.1", port)
        self._call({j: ("init", spec) for j, spec in enumerate(specs)})

    @property
    def pids(self) -> list[int]:
        """Process ids of locally spawned workers (server j is ``pids[j]``)."""
        return [p.pid for p in self.procs]

    def _call(self, requests: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        """Send every request first (workers run in parallel), then collect replies; failures -> None."""
        sent = []
        replies: dict[int, Any] = {}
        for j, request in requests.items():
            if j in self.dead:
                replies[j] = None
                continue
            try:
                send_obj(request, j + 1)
                sent.append(j)
            except RuntimeError:
                self.dead.add(j)
                replies[j] = None
        for j in sent:
            try:
                reply = recv_obj(j + 1)
            except RuntimeError:
                self.dead.add(j)
                reply = None
            if isinstance(reply, Exception):
                raise reply
            replies[j] = reply
        return replies

    def step(self, orders: dict[int, ServerOrder]) -> dict[int, ServerReply | None]:
        return self._call({j: ("step", o) for j, o in orders.items()})

    def backward(self, jobs: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor | None]:
        return self._call({j: ("backward", job) for j, job in jobs.items()})

    def infer(self, h_ND: Tensor, servers: list[int]) -> dict[int, Tensor | None]:
        return self._call({j: ("infer", h_ND) for j in servers})

    def reset(self, server: int) -> None:
        self._call({server: ("reset", None)})

    def kill(self, server: int) -> None:
        """SIGKILL a locally started worker (under torchrun: ask it to exit hard)."""
        if server in self.dead:
            return
        if self.procs:
            self.procs[server].kill()
            self.procs[server].wait(timeout=10)
        else:
            try:
                send_obj(("die", None), server + 1)
            except RuntimeError:
                pass
        self.dead.add(server)

    def profile(self, tokens: int, repeats: int) -> dict[int, dict[str, float] | None]:
        return self._call({j: ("profile", (tokens, repeats)) for j in range(self.num_servers)})

    def state_dict(self) -> dict[int, dict[str, Any] | None]:
        return self._call({j: ("state", None) for j in range(self.num_servers)})

    def load_state_dict(self, states: dict[int, dict[str, Any] | None]) -> None:
        self._call({j: ("load", s) for j, s in states.items() if s is not None})

    def close(self) -> None:
        if not dist.is_initialized():
            return
        self._call({j: ("stop", None) for j in range(self.num_servers)})
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1], float(sys.argv[2]))
