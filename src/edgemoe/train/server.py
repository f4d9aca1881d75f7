"""One edge server: its expert MLP, its optimizer and its real FIFO queue of token activations.

The server never keeps an autograd graph between calls. ``serve`` runs the expert forward without
grad and returns the outputs; ``backward`` gets the activations back with the router's gradient on
the outputs, *recomputes* the forward with grad, back-propagates, steps the optimizer and returns
the gradient on the activations. The same class runs in-process and inside a ``dist`` worker.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class ExpertMLP(nn.Module):
    """``dim -> hidden -> dim`` GELU MLP: the expert hosted by one edge server."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, hidden)
        self.w_out = nn.Linear(hidden, dim)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.w_out(nn.functional.gelu(self.w_in(x_TD)))


@dataclass(frozen=True)
class ServerSpec:
    """What a server needs to build its expert: width, optimizer, finite buffer (None = unbounded)."""

    index: int
    dim: int
    hidden: int
    lr: float
    buffer: int | None
    seed: int


class ExpertServer:
    """Expert ``index`` with a FIFO of (token id, activation) waiting for service."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed * 1000 + spec.index + 1)
            self.expert = ExpertMLP(spec.dim, spec.hidden)
        self.optimizer = torch.optim.Adam(self.expert.parameters(), lr=spec.lr)
        self.queue_ids_Q = torch.empty(0, dtype=torch.int64)
        self.queue_h_QD = torch.empty(0, spec.dim)

    @property
    def backlog(self) -> int:
        return int(self.queue_ids_Q.numel())

    def enqueue(self, ids_N: Tensor, h_ND: Tensor) -> Tensor:
        """Append tokens in order; returns the ids refused because the buffer is full (overflow)."""
        room = ids_N.numel() if self.spec.buffer is None else max(self.spec.buffer - self.backlog, 0)
        keep = min(room, ids_N.numel())
        self.queue_ids_Q = torch.cat([self.queue_ids_Q, ids_N[:keep]])
        self.queue_h_QD = torch.cat([self.queue_h_QD, h_ND[:keep]])
        return ids_N[keep:]

    def serve(self, count: int) -> tuple[Tensor, Tensor]:
        """Pop the first ``count`` tokens and return (ids, expert outputs), computed without grad."""
        count = min(max(int(count), 0), self.backlog)
        ids, h = self.queue_ids_Q[:count], self.queue_h_QD[:count]
        self.queue_ids_Q, self.queue_h_QD = self.queue_ids_Q[count:], self.queue_h_QD[count:]
        with torch.no_grad():
            y = self.expert(h) if count else h.new_empty(0, self.spec.dim)
        return ids, y

    def drain(self) -> tuple[Tensor, Tensor]:
        """Empty the queue (the server goes offline) and return what was waiting, in order."""
        ids, h = self.queue_ids_Q, self.queue_h_QD
        self.queue_ids_Q = torch.empty(0, dtype=torch.int64)
        self.queue_h_QD = torch.empty(0, self.spec.dim)
        return ids, h

    def backward(self, h_ND: Tensor, grad_y_ND: Tensor) -> Tensor:
        """Recompute the forward on ``h`` with grad, apply ``grad_y``, step; return dL/dh."""
        self.optimizer.zero_grad(set_to_none=True)
        if h_ND.shape[0] == 0:
            return torch.zeros_like(h_ND)
        h = h_ND.detach().requires_grad_(True)
        self.expert(h).backward(grad_y_ND)
        self.optimizer.step()
        assert h.grad is not None  # the expert's output depends on its input
        return h.grad

    def infer(self, h_ND: Tensor) -> Tensor:
        """Expert outputs for evaluation (no grad, queue untouched)."""
        with torch.no_grad():
            return self.expert(h_ND)

    def profile(self, tokens: int, repeats: int) -> dict[str, float]:
        """Median wall seconds per token of this expert's serve forward and backward recompute.

        Runs on a copy so the server's weights, optimizer and queue are untouched.
        """
        probe = ExpertServer(self.spec)
        probe.expert.load_state_dict(self.expert.state_dict())
        h_TD = torch.randn(tokens, self.spec.dim)
        ids_T = torch.arange(tokens)
        forward, backward = [], []
        for _ in range(repeats + 1):
            probe.enqueue(ids_T, h_TD)
            start = time.perf_counter()
            _, y_TD = probe.serve(tokens)
            mid = time.perf_counter()
            probe.backward(h_TD, torch.ones_like(y_TD))
            forward.append(mid - start)
            backward.append(time.perf_counter() - mid)
        fwd, bwd = statistics.median(forward[1:]), statistics.median(backward[1:])
        return {
            "forward_s_per_token": fwd / tokens,
            "backward_s_per_token": bwd / tokens,
            "s_per_token": (fwd + bwd) / tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "expert": self.expert.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "queue_ids": self.queue_ids_Q.clone(),
            "queue_h": self.queue_h_QD.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.expert.load_state_dict(state["expert"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queue_ids_Q = state["queue_ids"].clone()
        self.queue_h_QD = state["queue_h"].clone()
