"""Token arrival processes: how many tokens reach the router in each slot.

Each process owns a seeded ``numpy.random.Generator`` and supports ``state_dict()`` /
``load_state_dict()`` so a run can be checkpointed and resumed exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgemoe.edge.spec import ArrivalSpec
from edgemoe.edge.tracefile import read_trace_csv
from edgemoe.errors import ConfigError

__all__ = [
    "ArrivalProcess",
    "MMPPArrivals",
    "PoissonArrivals",
    "TraceArrivals",
    "make_arrivals",
    "read_trace_csv",
    "restore_rng",
    "rng_state",
]


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A copy of a generator's full state (plain dicts and ints, JSON-friendly)."""
    return dict(rng.bit_generator.state)


def restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


class ArrivalProcess:
    """Base class: ``sample(slots)`` returns int64 token counts for the next ``slots`` slots."""

    def __init__(self, seed: int | np.random.SeedSequence = 0):
        self.rng = np.random.default_rng(seed)

    def sample(self, slots: int) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(self.rng, state["rng"])


class PoissonArrivals(ArrivalProcess):
    def __init__(self, rate: float, seed: int | np.random.SeedSequence = 0):
        super().__init__(seed)
        self.rate = float(rate)

    def sample(self, slots: int) -> np.ndarray:
        return self.rng.poisson(self.rate, size=slots).astype(np.int64)


class MMPPArrivals(ArrivalProcess):
    """Markov-modulated Poisson: a hidden state with its own rate; state s is left w.p. ``switch_probs[s]``
    per slot (to a uniformly chosen other state). Sojourns are drawn as geometric run lengths, so
    sampling is vectorised."""

    def __init__(
        self,
        rates: list[float],
        switch_probs: list[float],
        seed: int | np.random.SeedSequence = 0,
        initial_state: int = 0,
    ):
        super().__init__(seed)
        self.rates = np.asarray(rates, dtype=np.float64)
        self.switch_probs = np.asarray(switch_probs, dtype=np.float64)
        self.state = int(initial_state)
        self.remaining = int(self.rng.geometric(self.switch_probs[self.state]))  # slots left in this sojourn

    def _states(self, slots: int) -> np.ndarray:
        out = np.empty(slots, dtype=np.int64)
        filled = 0
        while filled < slots:
            if self.remaining == 0:
                others = [s for s in range(len(self.rates)) if s != self.state]
                self.state = int(others[self.rng.integers(len(others))])
                self.remaining = int(self.rng.geometric(self.switch_probs[self.state]))
            take = min(self.remaining, slots - filled)
            out[filled : filled + take] = self.state
            filled += take
            self.remaining -= take
        return out

    def sample(self, slots: int) -> np.ndarray:
        states = self._states(slots)
        return self.rng.poisson(self.rates[states]).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "state": self.state, "remaining": self.remaining}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.state = int(state["state"])
        self.remaining = int(state["remaining"])


class TraceArrivals(ArrivalProcess):
    """Replays recorded counts per slot, cycling when the run outlasts the trace."""

    def __init__(self, counts: np.ndarray, seed: int | np.random.SeedSequence = 0):
        super().__init__(seed)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.position = 0

    def sample(self, slots: int) -> np.ndarray:
        idx = (self.position + np.arange(slots)) % len(self.counts)
        self.position = int((self.position + slots) % len(self.counts))
        return self.counts[idx]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])


def make_arrivals(spec: ArrivalSpec, seed: int | np.random.SeedSequence = 0) -> ArrivalProcess:
    """The arrival process an :class:`ArrivalSpec` describes, seeded."""
    if spec.kind == "poisson":
        return PoissonArrivals(spec.rate, seed)
    if spec.kind == "mmpp":
        return MMPPArrivals(spec.rates, spec.switch_probs, seed)
    if spec.trace is None:  # ArrivalSpec validation guarantees a path for kind 'trace'
        raise ConfigError("arrivals.trace", "kind 'trace' needs a CSV file path")
    return TraceArrivals(read_trace_csv(spec.trace), seed)
