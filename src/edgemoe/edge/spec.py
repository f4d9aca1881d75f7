"""Typed edge-network specification (servers, slots, arrivals, gate scores, controller defaults).

A :class:`NetworkSpec` is loaded from YAML (:func:`load_spec`) or by name (:func:`load_scenario`) and
validated on construction: every bad value raises :class:`~edgemoe.errors.ConfigError` naming the field.
Per-server quantities are exposed as float64 arrays with an ``_E`` suffix (one entry per server; servers
and experts share the axis letter ``E``, see :mod:`edgemoe`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgemoe.config import (
    check_choice,
    check_positive,
    check_range,
    from_dict,
    load_yaml,
    require,
    to_dict,
)
from edgemoe.edge.tracefile import read_trace_csv
from edgemoe.errors import ConfigError, InputError

GHZ = 1e9


@dataclass
class ServerSpec:
    """One edge server (hosting one expert), or ``count`` identical ones (a tier)."""

    f_max: float
    """Maximum CPU frequency, cycles/s."""
    cycles_per_token: float
    """CPU cycles to process one token through the expert (C_j)."""
    kappa: float
    """Effective switched capacitance: energy per slot is kappa * f^3 * tau (joules)."""
    energy_budget: float
    """Time-average energy budget E_j^max, joules per slot."""
    f_min: float = 0.0
    """Lowest frequency the server runs at while it has backlog, cycles/s."""
    count: int = 1
    """Number of identical servers this entry stands for."""
    name: str = ""

    def __post_init__(self) -> None:
        check_positive(self.f_max, "f_max")
        check_positive(self.cycles_per_token, "cycles_per_token")
        check_positive(self.kappa, "kappa")
        check_positive(self.energy_budget, "energy_budget")
        check_positive(self.f_min, "f_min", allow_zero=True)
        require(self.f_min <= self.f_max, "f_min", f"must be <= f_max ({self.f_max}), got {self.f_min}")
        require(self.count >= 1, "count", f"must be >= 1, got {self.count}")


@dataclass
class ArrivalSpec:
    """Token arrivals at the router per slot.

    ``poisson``: Poisson(rate). ``mmpp``: a Markov-modulated Poisson process; state s has rate
    ``rates[s]`` and leaves to the other state(s) with probability ``switch_probs[s]`` per slot (for two
    states that is the other one). ``trace``: counts per slot from a CSV file (column ``tokens``, or the
    first column), cycled when the run is longer than the trace.
    """

    kind: Literal["poisson", "mmpp", "trace"] = "poisson"
    rate: float = 400.0
    rates: list[float] = field(default_factory=list)
    switch_probs: list[float] = field(default_factory=list)
    trace: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", ["poisson", "mmpp", "trace"])
        check_positive(self.rate, "rate", allow_zero=True)
        if self.kind == "mmpp":
            require(len(self.rates) >= 2, "rates", "mmpp needs at least two state rates, e.g. [200, 800]")
            require(
                len(self.switch_probs) == len(self.rates),
                "switch_probs",
                f"needs one probability per state ({len(self.rates)}), got {len(self.switch_probs)}",
            )
            for i, r in enumerate(self.rates):
                check_positive(r, f"rates[{i}]", allow_zero=True)
            for i, p in enumerate(self.switch_probs):
                check_range(p, f"switch_probs[{i}]", 0.0, 1.0)
                require(p > 0, f"switch_probs[{i}]", "must be > 0 so every state is left eventually")
        if self.kind == "trace":
            require(bool(self.trace), "trace", "kind 'trace' needs a CSV file path in 'trace'")

    def mean_rate(self) -> float:
        """Long-run tokens per slot (stationary mean for mmpp; the CSV mean for a trace)."""
        if self.kind == "poisson":
            return self.rate
        if self.kind == "mmpp":
            # Stationary distribution of a chain that leaves state s w.p. p_s and picks another uniformly:
            # for two states pi_s ∝ 1/p_s; in general pi_s ∝ 1/p_s too (uniform jumps, symmetric kernel).
            w = np.array([1.0 / p for p in self.switch_probs])
            return float(np.dot(w / w.sum(), self.rates))
        if self.trace is None:
            raise ConfigError("trace", "kind 'trace' needs a CSV file path in 'trace'")
        return float(read_trace_csv(self.trace).mean())


@dataclass
class ScoreSpec:
    """Gate-score stream used by the simulator.

    ``skewed``: a synthetic gate with latent token classes. Expert popularity decays along the servers
    ordered by speed (``popular: slow`` puts the popular experts on the slowest servers, as in the
    paper's stress case): weight_j = exp(-skew * rank_j / (E - 1)). Each class draws a logit offset per
    expert (normal, std ``class_spread``) on top of log-popularity, each token adds noise (std
    ``token_noise``), and the gate is softmax(logits / temperature). ``structure_seed`` fixes the class
    structure (the "trained gate"); the per-run seed only draws tokens.
    ``replay``: scores recorded from a real model (``trace``: an ``.npz`` from
    :func:`edgemoe.edge.scores.save_score_trace`); the token counts per slot come from the recording.
    """

    kind: Literal["skewed", "replay"] = "skewed"
    num_classes: int = 10
    skew: float = 3.0
    popular: Literal["slow", "fast"] = "slow"
    class_spread: float = 1.2
    token_noise: float = 0.5
    temperature: float = 1.0
    structure_seed: int = 0
    trace: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", ["skewed", "replay"])
        require(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        check_positive(self.skew, "skew", allow_zero=True)
        check_choice(self.popular, "popular", ["slow", "fast"])
        check_positive(self.class_spread, "class_spread", allow_zero=True)
        check_positive(self.token_noise, "token_noise", allow_zero=True)
        check_positive(self.temperature, "temperature")
        if self.kind == "replay":
            require(bool(self.trace), "trace", "kind 'replay' needs an .npz path in 'trace'")


@dataclass
class ControllerSpec:
    """Default parameters of the per-slot controllers (each can be overridden per policy).

    ``V`` trades utility for backlog; ``omega1`` weighs throughput, ``omega2`` gating consistency.
    ``energy_weight`` (w) sets how strongly energy debt counts against token backlog: the virtual energy
    queue is weighted so that the Lyapunov frequency equals the budget-sustainable one when
    Z_j / E_j^max = (Q_j + V*omega1) / w (see docs/stable-moe.md). ``block`` is the number of tokens that
    share one provisional backlog in ``sequential`` routing (1 = strictly token by token; 0 = auto, 16
    blocks per slot). ``capacity_factor`` is for ``topk-capacity``.
    """

    V: float = 300.0
    omega1: float = 1.0
    omega2: float = 1.0
    energy_weight: float = 10.0
    mode: Literal["linear", "sequential"] = "sequential"
    block: int = 0
    capacity_factor: float = 1.25

    def __post_init__(self) -> None:
        check_positive(self.V, "V", allow_zero=True)
        check_positive(self.omega1, "omega1", allow_zero=True)
        check_positive(self.omega2, "omega2", allow_zero=True)
        check_positive(self.energy_weight, "energy_weight")
        check_choice(self.mode, "mode", ["linear", "sequential"])
        require(self.block >= 0, "block", f"must be >= 0 (0 = auto), got {self.block}")
        check_positive(self.capacity_factor, "capacity_factor")


@dataclass
class NetworkSpec:
    """E edge servers, slot length tau, K experts per token, arrivals, gate scores, controller defaults."""

    name: str = "custom"
    servers: list[ServerSpec] = field(default_factory=list)
    tau: float = 1.0
    k: int = 2
    arrivals: ArrivalSpec = field(default_factory=ArrivalSpec)
    scores: ScoreSpec = field(default_factory=ScoreSpec)
    controller: ControllerSpec = field(default_factory=ControllerSpec)

    def __post_init__(self) -> None:
        require(len(self.servers) > 0, "servers", "must list at least one server")
        check_positive(self.tau, "tau")
        require(
            isinstance(self.k, int) and 1 <= self.k <= self.num_servers,
            "k",
            f"must be an integer in [1, E={self.num_servers}] (experts per token <= servers), got {self.k}",
        )

    @cached_property
    def _expanded(self) -> list[ServerSpec]:
        return [s for s in self.servers for _ in range(s.count)]

    @property
    def num_servers(self) -> int:
        return sum(s.count for s in self.servers)

    def _array(self, attr: str) -> np.ndarray:
        return np.array([getattr(s, attr) for s in self._expanded], dtype=np.float64)

    @cached_property
    def f_max_E(self) -> np.ndarray:
        return self._array("f_max")

    @cached_property
    def f_min_E(self) -> np.ndarray:
        return self._array("f_min")

    @cached_property
    def cycles_E(self) -> np.ndarray:
        return self._array("cycles_per_token")

    @cached_property
    def kappa_E(self) -> np.ndarray:
        return self._array("kappa")

    @cached_property
    def budget_E(self) -> np.ndarray:
        return self._array("energy_budget")

    @cached_property
    def f_sustainable_E(self) -> np.ndarray:
        """Highest frequency whose energy per slot stays within budget: min(f_max, (E^max/(kappa tau))^(1/3))."""
        return np.minimum(self.f_max_E, np.cbrt(self.budget_E / (self.kappa_E * self.tau)))

    def capacity_E(self, freq_E: np.ndarray) -> np.ndarray:
        """Tokens a server can process in one slot at ``freq_E``: D_j = f_j tau / C_j."""
        return freq_E * self.tau / self.cycles_E

    def energy_E(self, freq_E: np.ndarray) -> np.ndarray:
        """Energy spent in one slot at ``freq_E``: E_j = kappa_j f_j^3 tau."""
        return self.kappa_E * freq_E**3 * self.tau

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def spec_from_dict(data: dict[str, Any]) -> NetworkSpec:
    """Build and validate a :class:`NetworkSpec` from a plain mapping (YAML document)."""
    return from_dict(NetworkSpec, data)


def load_spec(path: str | Path) -> NetworkSpec:
    """Load a network spec from a YAML file; relative trace paths resolve against the file's folder."""
    path = Path(path)
    data = load_yaml(path)
    for section in ("arrivals", "scores"):
        sub = data.get(section)
        if isinstance(sub, dict) and isinstance(sub.get("trace"), str):
            trace = Path(sub["trace"])
            if not trace.is_absolute():
                sub = dict(sub, trace=str(path.parent / trace))
                data[section] = sub
    return spec_from_dict(data)


def _paper_servers(f_ghz: list[float], cycles: float = 1e7) -> list[dict[str, Any]]:
    return [
        {"f_max": f * GHZ, "cycles_per_token": cycles, "kappa": 1e-28, "energy_budget": 0.5} for f in f_ghz
    ]


PAPER_F_GHZ = [1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 3.0, 3.0]

SCENARIOS: dict[str, dict[str, Any]] = {
    # E=8, K=2, Poisson 400 tokens/slot; the 0.5 J budget binds on the 2 and 3 GHz servers
    # (sustainable 1.71 GHz), so the network sustains about 1,184 token-computations per slot against
    # a demand of K*lambda = 800. Gate popularity is skewed toward the slow servers.
    "paper": {
        "name": "paper",
        "servers": _paper_servers(PAPER_F_GHZ),
        "tau": 1.0,
        "k": 2,
        "arrivals": {"kind": "poisson", "rate": 400.0},
        "scores": {"kind": "skewed", "popular": "slow"},
    },
    # Same totals (sum of f_max, budgets, demand) on eight equal servers; popularity skewed by index.
    "homogeneous": {
        "name": "homogeneous",
        "servers": _paper_servers([sum(PAPER_F_GHZ) / len(PAPER_F_GHZ)] * len(PAPER_F_GHZ)),
        "tau": 1.0,
        "k": 2,
        "arrivals": {"kind": "poisson", "rate": 400.0},
        "scores": {"kind": "skewed", "popular": "slow"},
    },
    # The paper network with 2-state MMPP arrivals: 200 or 800 tokens/slot, mean 400, bursts ~10 slots.
    "bursty": {
        "name": "bursty",
        "servers": _paper_servers(PAPER_F_GHZ),
        "tau": 1.0,
        "k": 2,
        "arrivals": {"kind": "mmpp", "rates": [200.0, 800.0], "switch_probs": [0.05, 0.1]},
        "scores": {"kind": "skewed", "popular": "slow"},
    },
    # E=64 in four tiers of 16 (1, 1.5, 2, 3 GHz), 4,096 tokens/slot, K=2, C=8e6 cycles/token:
    # sustainable capacity ~11,840 against a demand of 8,192 (the same load ratio as `paper`).
    "large": {
        "name": "large",
        "servers": [
            {**s, "count": 16}
            for s in _paper_servers([1.0, 1.5, 2.0, 3.0], cycles=8e6)  # four heterogeneous tiers
        ],
        "tau": 1.0,
        "k": 2,
        "arrivals": {"kind": "poisson", "rate": 4096.0},
        "scores": {"kind": "skewed", "popular": "slow", "num_classes": 32},
    },
}


def load_scenario(name: str, overrides: dict[str, Any] | None = None) -> NetworkSpec:
    """A named scenario (``paper``, ``homogeneous``, ``bursty``, ``large``), optionally with a nested
    mapping of field overrides merged on top (e.g. ``{"controller": {"V": 10}}``)."""
    if name not in SCENARIOS:
        raise ConfigError("scenario", f"unknown scenario {name!r}; choose one of {sorted(SCENARIOS)}")
    data = copy.deepcopy(SCENARIOS[name])
    return spec_from_dict(merge_dicts(data, overrides or {}))


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def check_scores(scores_NE: np.ndarray, num_servers: int, field_name: str = "scores_NE") -> np.ndarray:
    """Validate a gate-score matrix handed over at run time: 2-D, E columns, finite. Returns it as an
    array; a bad matrix raises :class:`~edgemoe.errors.InputError` (it is data, not configuration)."""
    scores_NE = np.asarray(scores_NE)
    if scores_NE.ndim != 2 or scores_NE.shape[1] != num_servers:
        raise InputError(field_name, f"must have shape [N, E={num_servers}], got {scores_NE.shape}")
    # Fast path: a finite sum of float scores means no NaN/inf (an overflowing sum falls through).
    if not np.isfinite(scores_NE.sum()) and not np.isfinite(scores_NE).all():
        bad = int(np.argwhere(~np.isfinite(scores_NE))[0][0])
        raise InputError(field_name, f"must be finite; row {bad} contains NaN or inf")
    return scores_NE
