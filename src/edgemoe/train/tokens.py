"""Router-side bookkeeping of every token in flight.

A sample is ``group`` = P tokens (image patches; P = 1: the sample is one token), with consecutive
token ids. Each token has K assignment columns. A column is ``QUEUED`` at a server, ``DONE`` (that
expert's output is back) or ``DROPPED`` (overflowed a finite buffer, dropped by a capacity policy,
or no live server could take it). A token is *complete* when none of its columns is queued; a
sample is complete when all its P tokens are. Complete samples are popped together, trained on
once, and never seen again — so no token is lost or counted twice. A token whose every assignment
was dropped still trains (through the residual path, with zero expert output). The router keeps
the activation it sent, so a failed server's queued tokens can be re-sent elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

QUEUED, DONE, DROPPED = 0, 1, 2


@dataclass
class CompletedTokens:
    """Tokens whose expert outputs are all back (or dropped), ready to be trained on."""

    ids_N: np.ndarray
    samples_N: np.ndarray
    arrival_N: np.ndarray
    h_ND: Tensor
    experts_NK: np.ndarray
    kept_NK: np.ndarray
    y_NKD: Tensor

    def __len__(self) -> int:
        return len(self.ids_N)


class TokenTable:
    """Tokens in flight, rows sorted by token id (ids only ever grow), whole samples of ``group``
    consecutive rows."""

    def __init__(self, k: int, dim: int, group: int = 1):
        self.k, self.dim, self.group = k, dim, group
        self.ids_P = np.empty(0, dtype=np.int64)
        self.samples_P = np.empty(0, dtype=np.int64)
        self.arrival_P = np.empty(0, dtype=np.int64)
        self.experts_PK = np.empty((0, k), dtype=np.int64)
        self.status_PK = np.empty((0, k), dtype=np.int8)
        self.h_PD = torch.empty(0, dim)
        self.y_PKD = torch.empty(0, k, dim)

    def __len__(self) -> int:
        return len(self.ids_P)

    def add(
        self,
        ids_N: np.ndarray,
        samples_N: np.ndarray,
        slot: int,
        h_ND: Tensor,
        experts_NK: np.ndarray,
        kept_NK: np.ndarray,
    ) -> None:
        """Register newly routed tokens; assignments not kept by the controller start as dropped."""
        if len(self.ids_P) and len(ids_N) and ids_N[0] <= self.ids_P[-1]:
            raise ValueError("token ids must increase")
        if len(ids_N) % self.group:
            raise ValueError(f"tokens come in whole samples of {self.group}")
        self.ids_P = np.concatenate([self.ids_P, ids_N])
        self.samples_P = np.concatenate([self.samples_P, samples_N])
        self.arrival_P = np.concatenate([self.arrival_P, np.full(len(ids_N), slot, dtype=np.int64)])
        self.experts_PK = np.concatenate([self.experts_PK, experts_NK.astype(np.int64)])
        status = np.where(kept_NK, QUEUED, DROPPED).astype(np.int8)
        self.status_PK = np.concatenate([self.status_PK, status])
        self.h_PD = torch.cat([self.h_PD, h_ND])
        self.y_PKD = torch.cat([self.y_PKD, h_ND.new_zeros(len(ids_N), self.k, self.dim)])

    def _cells(self, server: int, ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.searchsorted(self.ids_P, ids_N)
        ok = (rows < len(self.ids_P)) & (self.ids_P[np.minimum(rows, len(self.ids_P) - 1)] == ids_N)
        match = self.experts_PK[rows] == server if ok.all() else None
        if match is None or not match.any(axis=1).all():
            raise RuntimeError(f"server {server} returned tokens the router did not send it")
        cols = match.argmax(axis=1)
        if (self.status_PK[rows, cols] != QUEUED).any():
            raise RuntimeError(f"server {server} returned a token twice")
        return rows, cols

    def deliver(self, server: int, ids_N: np.ndarray, y_ND: Tensor) -> None:
        """Store server ``server``'s outputs for ``ids_N``."""
        if len(ids_N) == 0:
            return
        rows, cols = self._cells(server, ids_N)
        self.y_PKD[torch.from_numpy(rows), torch.from_numpy(cols)] = y_ND
        self.status_PK[rows, cols] = DONE

    def drop(self, server: int, ids_N: np.ndarray) -> None:
        """Mark ``server``'s assignments of ``ids_N`` dropped (buffer overflow)."""
        if len(ids_N):
            rows, cols = self._cells(server, ids_N)
            self.status_PK[rows, cols] = DROPPED

    def queued_on(self, server: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the assignments still queued at ``server``, in token order."""
        rows, cols = np.nonzero((self.experts_PK == server) & (self.status_PK == QUEUED))
        return rows, cols

    def reassign(self, rows: np.ndarray, cols: np.ndarray, servers: np.ndarray) -> None:
        """Move queued assignments to new servers (``-1`` drops them)."""
        self.experts_PK[rows, cols] = np.where(servers >= 0, servers, self.experts_PK[rows, cols])
        self.status_PK[rows[servers < 0], cols[servers < 0]] = DROPPED

    def backlog_E(self, num_servers: int) -> np.ndarray:
        """Queued assignments per server (the mirror of the servers' real queues)."""
        return np.bincount(self.experts_PK[self.status_PK == QUEUED], minlength=num_servers)

    def num_samples(self) -> int:
        return len(self.ids_P) // self.group

    def pop_completed(self) -> CompletedTokens:
        """Remove and return every sample none of whose tokens has a queued assignment left."""
        done = ~(self.status_PK == QUEUED).any(axis=1)
        done = np.repeat(done.reshape(-1, self.group).all(axis=1), self.group)
        idx = np.flatnonzero(done)
        tidx = torch.from_numpy(idx)
        out = CompletedTokens(
            ids_N=self.ids_P[idx],
            samples_N=self.samples_P[idx],
            arrival_N=self.arrival_P[idx],
            h_ND=self.h_PD[tidx],
            experts_NK=self.experts_PK[idx],
            kept_NK=self.status_PK[idx] == DONE,
            y_NKD=self.y_PKD[tidx],
        )
        keep = torch.from_numpy(np.flatnonzero(~done))
        for name in ("ids_P", "samples_P", "arrival_P", "experts_PK", "status_PK"):
            setattr(self, name, getattr(self, name)[~done])
        self.h_PD, self.y_PKD = self.h_PD[keep], self.y_PKD[keep]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: _copy(getattr(self, name)) for name in _FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in _FIELDS:
            setattr(self, name, _copy(state[name]))


_FIELDS = ("ids_P", "samples_P", "arrival_P", "experts_PK", "status_PK", "h_PD", "y_PKD")


def _copy(value: np.ndarray | Tensor) -> np.ndarray | Tensor:
    return value.copy() if isinstance(value, np.ndarray) else value.clone()
