"""Per-slot controllers: given the queues and the gate's scores, choose K experts per token and each
server's CPU frequency.

One interface for all of them, ``decide(state, scores_NE) -> Decision``, used both by the simulator
and by the training loop. Everything is vectorised over tokens (``sequential`` routing loops over
blocks of tokens, never over single tokens unless ``block=1`` is asked for).

Stable-MoE's per-slot problem (with the energy queue weighted by beta_j, see
docs/stable-moe.md): minimise over x (K experts per token) and f

    sum_j Q_j (A_j - D_j) + sum_j beta_j Z_j (E_j - E_j^max) - V (omega1 sum_j D_j + omega2 sum_ij g_ij x_ij)

which separates into routing (each token takes the K largest V omega2 g_ij - Q_j) and one convex
scalar problem per server with the closed form of :func:`lyapunov_frequency`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgemoe.config import ConfigError, require
from edgemoe.edge.arrivals import restore_rng, rng_state
from edgemoe.edge.spec import ControllerSpec, NetworkSpec, check_scores
from edgemoe.edge.state import NetworkState
from edgemoe.registry import Registry

FreqRule = Literal["lyapunov", "sustainable", "max"]


@dataclass(frozen=True)
class Decision:
    """One slot's decision. ``expert_ids_NK[i]`` are token i's K distinct servers; ``kept_NK`` is False
    where an assignment was dropped (capacity overflow; ``None`` means all kept); ``freq_E`` in cycles/s."""

    expert_ids_NK: np.ndarray
    freq_E: np.ndarray
    kept_NK: np.ndarray | None = None

    def kept_mask(self) -> np.ndarray:
        if self.kept_NK is None:
            return np.ones(self.expert_ids_NK.shape, dtype=bool)
        return self.kept_NK

    def routed_E(self, num_servers: int) -> np.ndarray:
        """A_j: kept assignments per server."""
        ids = self.expert_ids_NK if self.kept_NK is None else self.expert_ids_NK[self.kept_NK]
        return np.bincount(ids.ravel(), minlength=num_servers).astype(np.float64)


# ---------------------------------------------------------------------------------------------------
# Building blocks


def topk_ids(values_NE: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row (unordered within the row), int64 [N, k]."""
    J = values_NE.shape[1]
    if k == J:
        return np.broadcast_to(np.arange(J), values_NE.shape).copy()
    return values_NE.argpartition(J - k, axis=1)[:, J - k :]


def masked(values_NE: np.ndarray, online_E: np.ndarray) -> np.ndarray:
    """Offline servers' columns set to -inf so no top-k picks them."""
    if online_E.all():
        return values_NE
    return np.where(online_E, values_NE, -np.inf)


def check_online(state: NetworkState, k: int) -> None:
    n_online = int(np.count_nonzero(state.online_E))
    require(
        n_online >= k,
        "state.online_E",
        f"only {n_online} servers are online but every token needs K={k} distinct experts; "
        "bring servers back online or lower k",
    )


def energy_weight_E(spec: NetworkSpec, energy_weight: float) -> np.ndarray:
    """beta_j = w / (3 kappa_j C_j E_j^max f_sust_j^2): scales the virtual energy queue so that the
    Lyapunov frequency equals the sustainable one when Z_j / E_j^max = (Q_j + V omega1) / w."""
    return energy_weight / (3 * spec.kappa_E * spec.cycles_E * spec.budget_E * spec.f_sustainable_E**2)


def frequency_bounds(spec: NetworkSpec, state: NetworkState) -> tuple[np.ndarray, np.ndarray]:
    """Feasible frequency interval per server: hi = min(f_max, C Q / tau) (no faster than the backlog
    needs), lo = min(f_min, hi); both 0 when offline."""
    hi = np.minimum(spec.f_max_E, spec.cycles_E * state.backlog_E / spec.tau)
    hi = np.where(state.online_E, hi, 0.0)
    lo = np.minimum(spec.f_min_E, hi)
    return lo, hi


def lyapunov_frequency(
    spec: NetworkSpec, state: NetworkState, V: float, omega1: float, energy_weight: float
) -> np.ndarray:
    """Closed-form minimiser of tau (beta Z kappa f^3 - (Q + V omega1) f / C) over [lo, hi]:
    f* = sqrt((Q + V omega1) / (3 beta kappa C Z)) clipped, or hi when Z = 0 (the objective is then
    non-increasing in f)."""
    lo, hi = frequency_bounds(spec, state)
    Z = state.energy_queue_E
    # With beta from energy_weight_E this is f_sust * sqrt((Q + V omega1) E^max / (w Z)).
    pressure = (state.backlog_E + V * omega1) * spec.budget_E / energy_weight
    ratio = np.divide(pressure, Z, out=np.full(len(Z), np.inf), where=Z > 0)
    return np.minimum(np.maximum(spec.f_sustainable_E * np.sqrt(ratio), lo), hi)


def rule_frequency(
    rule: FreqRule, spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec | None = None
) -> np.ndarray:
    """Frequency per server under a named rule, always within [lo, hi] of :func:`frequency_bounds`."""
    if rule == "lyapunov":
        if cfg is None:
            raise TypeError("rule_frequency: the 'lyapunov' rule needs the controller settings (cfg)")
        return lyapunov_frequency(spec, state, cfg.V, cfg.omega1, cfg.energy_weight)
    lo, hi = frequency_bounds(spec, state)
    target = spec.f_max_E if rule == "max" else spec.f_sustainable_E
    return np.minimum(np.maximum(target, lo), hi)


AUTO_BLOCKS = 16
"""Provisional-backlog updates per slot in ``sequential`` routing when ``block`` is 0 (auto)."""


def auto_block(num_tokens: int, block: int) -> int:
    """Tokens per provisional-backlog block: ``block`` if set, else 16 blocks per slot."""
    return block if block > 0 else max(1, math.ceil(num_tokens / AUTO_BLOCKS))


def route_linear(utility_NE: np.ndarray, backlog_E: np.ndarray, k: int) -> np.ndarray:
    """Each token takes the K largest utility_ij - Q_j (computed in place, in utility_NE's dtype:
    float32 gate scores keep the selection on float32, about twice as fast as float64)."""
    utility_NE -= backlog_E.astype(utility_NE.dtype)
    return topk_ids(utility_NE, k)


def route_sequential(utility_NE: np.ndarray, backlog_E: np.ndarray, k: int, block: int) -> np.ndarray:
    """Like :func:`route_linear` but a provisional backlog Q~_j grows by one per assignment within the
    slot, so one slot's tokens do not all join the same short queue. Tokens are processed in blocks of
    ``block`` that share one Q~ (``block=1`` is the strict token-by-token rule)."""
    N, J = utility_NE.shape
    provisional_E = np.asarray(backlog_E, dtype=utility_NE.dtype).copy()
    ids_NK = np.empty((N, k), dtype=np.int64)
    buffer = np.empty((min(block, N), J), dtype=utility_NE.dtype)
    for start in range(0, N, block):
        rows = utility_NE[start : start + block]
        values = np.subtract(rows, provisional_E, out=buffer[: len(rows)])
        out = ids_NK[start : start + block]
        out[:] = topk_ids(values, k)
        provisional_E += np.bincount(out.ravel(), minlength=J)  # a contiguous view: no copy
    return ids_NK


# ---------------------------------------------------------------------------------------------------
# Controllers


class Controller:
    """Base class. Subclasses implement ``_route``; frequency follows ``freq_rule``."""

    name = "controller"
    freq_rule: FreqRule = "lyapunov"
    balance_loss = False
    """Whether a trainer should add the router's load-balance loss for this policy."""

    def __init__(self, spec: NetworkSpec, cfg: ControllerSpec | None = None):
        self.spec = spec
        self.cfg = cfg or spec.controller
        self.k = spec.k

    def decide(self, state: NetworkState, scores_NE: np.ndarray) -> Decision:
        """Route this slot's tokens (gate scores ``scores_NE``) and set each server's frequency."""
        scores_NE = check_scores(scores_NE, self.spec.num_servers)
        check_online(state, self.k)
        ids_NK, kept_NK = self._route(state, scores_NE)
        freq_E = rule_frequency(self.freq_rule, self.spec, state, self.cfg)
        return Decision(ids_NK, freq_E, kept_NK)

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class StableMoE(Controller):
    """Drift-plus-penalty routing (``linear`` or ``sequential``) with the closed-form Lyapunov
    frequency; ``freq_rule='sustainable'`` gives the fixed-frequency ablation."""

    name = "stable-moe"

    def __init__(
        self, spec: NetworkSpec, cfg: ControllerSpec | None = None, freq_rule: FreqRule = "lyapunov"
    ):
        super().__init__(spec, cfg)
        self.freq_rule = freq_rule

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, None]:
        # A fresh array in the scores' floating dtype (float32 for a real gate, float64 otherwise).
        dtype = scores_NE.dtype if np.issubdtype(scores_NE.dtype, np.floating) else np.float64
        utility_NE = masked(np.multiply(scores_NE, self.cfg.V * self.cfg.omega2, dtype=dtype), state.online_E)
        if self.cfg.mode == "linear":
            return route_linear(utility_NE, state.backlog_E, self.k), None
        block = auto_block(len(scores_NE), self.cfg.block)
        return route_sequential(utility_NE, state.backlog_E, self.k, block), None


def water_fill_counts(backlog_E: np.ndarray, num_tokens: int, k: int) -> np.ndarray:
    """Assignments per server when ``num_tokens`` identical tokens each join the K shortest provisional
    queues in turn (raising each by one): the N*K cheapest "units", where server j's m-th unit costs
    Q_j + m and a server takes at most one unit per token (m < N). Equal to the token-by-token rule
    (tested), computed by one partition instead of a loop."""
    J = len(backlog_E)
    total = num_tokens * k
    if total == J * num_tokens:
        return np.full(J, num_tokens, dtype=np.int64)
    costs_EN = backlog_E[:, None] + np.arange(num_tokens)[None, :]
    threshold = np.partition(costs_EN.ravel(), total - 1)[total - 1]
    counts = (costs_EN < threshold).sum(axis=1)
    at_threshold = np.flatnonzero((costs_EN == threshold).any(axis=1))  # ties: lowest index first
    counts[at_threshold[: total - counts.sum()]] += 1
    return counts


class JSQK(Controller):
    """Join-the-K-shortest-queues: ignores the gate. ``linear``: every token joins the K shortest queues
    at the start of the slot; ``sequential``: token by token, each assignment raising the provisional
    queue by one, computed exactly as water-filling (:func:`water_fill_counts`); listing the servers
    with their counts and dealing the list out in K strides of N gives every token K distinct servers.
    The servers are listed in a random order and the tokens dealt in a random order every slot, so no
    pair of servers is tied together (dealt in index order, server j would nearly always be paired
    with j + J/K). Frequency: the Lyapunov rule with V = 0."""

    name = "jsq-k"

    def __init__(self, spec: NetworkSpec, cfg: ControllerSpec | None = None, seed: int = 0):
        super().__init__(spec, dataclasses.replace(cfg or spec.controller, V=0.0))
        self.rng = np.random.default_rng(seed)

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, None]:
        N = len(scores_NE)
        servers = np.flatnonzero(state.online_E)
        if self.cfg.mode == "linear":
            best = servers[np.argsort(state.backlog_E[servers], kind="stable")[: self.k]]
            return np.broadcast_to(best, (N, self.k)).copy(), None
        counts = water_fill_counts(state.backlog_E[servers], N, self.k)
        order = self.rng.permutation(len(servers))
        # Each server appears at most N times in a row, so entries i, i + N, ... are distinct.
        ids_NK = np.repeat(servers[order], counts[order]).reshape(self.k, N).T
        return ids_NK[self.rng.permutation(N)].copy(), None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(self.rng, state["rng"])


class TopK(Controller):
    """Plain gate-following top-K, at f_max (``freq_rule='max'``) or at the budget-sustainable
    frequency (``'sustainable'``)."""

    name = "topk"

    def __init__(self, spec: NetworkSpec, cfg: ControllerSpec | None = None, freq_rule: FreqRule = "max"):
        super().__init__(spec, cfg)
        self.freq_rule = freq_rule

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, None]:
        return topk_ids(masked(scores_NE, state.online_E), self.k), None


def group_rank(keys: np.ndarray, num_groups: int) -> np.ndarray:
    """For each entry, how many earlier entries share its key (0-based position within its group)."""
    if num_groups < np.iinfo(np.int16).max:
        keys = keys.astype(np.int16)  # a stable sort of 16-bit keys is a linear-time radix sort
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.searchsorted(sorted_keys, np.arange(num_groups))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - starts[sorted_keys]
    return rank


def capacity_keep(ids_NK: np.ndarray, num_servers: int, capacity: int) -> np.ndarray:
    """Keep each server's first ``capacity`` assignments in token order; the rest are dropped."""
    return (group_rank(ids_NK.ravel(), num_servers) < capacity).reshape(ids_NK.shape)


class TopKCapacity(Controller):
    """Top-K with a per-expert capacity of ceil(capacity_factor * N K / J_online) assignments per slot
    (Switch/GShard style); overflow is dropped. Runs at the budget-sustainable frequency."""

    name = "topk-capacity"
    freq_rule: FreqRule = "sustainable"

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids_NK = topk_ids(masked(scores_NE, state.online_E), self.k)
        n_online = int(np.count_nonzero(state.online_E))
        capacity = math.ceil(self.cfg.capacity_factor * len(scores_NE) * self.k / n_online)
        return ids_NK, capacity_keep(ids_NK, self.spec.num_servers, capacity)


class RandomK(Controller):
    """K distinct servers uniformly at random among the online ones; budget-sustainable frequency."""

    name = "random-k"
    freq_rule: FreqRule = "sustainable"

    def __init__(self, spec: NetworkSpec, cfg: ControllerSpec | None = None, seed: int = 0):
        super().__init__(spec, cfg)
        self.rng = np.random.default_rng(seed)

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, None]:
        keys_NE = self.rng.random(scores_NE.shape)
        return topk_ids(masked(keys_NE, state.online_E), self.k), None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(self.rng, state["rng"])


BIAS_RATE = 5e-3
"""Default bias step of the balancers per slot, in gate-score units (softmax scores average 1/J; at
this rate a bias crosses the mean score of an 8-expert gate in 25 slots)."""


class BiasBalance(Controller):
    """Top-K of gate scores plus a per-server bias, balanced without an auxiliary loss (DeepSeek-V3):
    after every slot each online server's bias moves by ``bias_rate`` up if it got fewer than its
    target share of the slot's assignments, down if more. ``target='uniform'``: equal shares;
    ``'capacity'``: shares proportional to f_max/C (tokens per second at full speed). Frequency: the
    Lyapunov rule with V = 0, as for JSQ-K (queue-aware and within the energy budget), so against
    JSQ-K only the routing differs."""

    name = "bias-uniform"

    def __init__(
        self,
        spec: NetworkSpec,
        cfg: ControllerSpec | None = None,
        target: Literal["uniform", "capacity"] = "uniform",
        bias_rate: float = BIAS_RATE,
    ):
        super().__init__(spec, dataclasses.replace(cfg or spec.controller, V=0.0))
        require(bias_rate >= 0 and math.isfinite(bias_rate), "bias_rate", f"must be >= 0, got {bias_rate}")
        weight_E = np.ones(spec.num_servers) if target == "uniform" else spec.f_max_E / spec.cycles_E
        self.weight_E = weight_E / weight_E.sum()
        self.bias_rate = bias_rate
        self.bias_E = np.zeros(spec.num_servers)

    def _route(self, state: NetworkState, scores_NE: np.ndarray) -> tuple[np.ndarray, None]:
        ids_NK = topk_ids(masked(scores_NE + self.bias_E, state.online_E), self.k)
        load_E = np.bincount(ids_NK.ravel(), minlength=self.spec.num_servers)
        target_E = np.where(state.online_E, self.weight_E, 0.0)
        target_E *= ids_NK.size / max(target_E.sum(), 1e-12)
        self.bias_E += self.bias_rate * np.sign(target_E - load_E) * state.online_E
        return ids_NK, None

    def state_dict(self) -> dict[str, Any]:
        return {"bias_E": self.bias_E.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bias_E = np.array(state["bias_E"], dtype=np.float64)


class TopKSwitch(TopK):
    """Plain top-K routing whose gate is trained with the Switch load-balance loss (the trainer adds
    it, weight ``SWITCH_COEF`` unless ``model.aux_coef`` is set); Lyapunov frequency with V = 0."""

    name = "topk-switch"
    balance_loss = True

    def __init__(self, spec: NetworkSpec, cfg: ControllerSpec | None = None):
        super().__init__(spec, dataclasses.replace(cfg or spec.controller, V=0.0), freq_rule="lyapunov")


SWITCH_COEF = 1e-2
"""Switch Transformer's load-balance loss weight."""


# ---------------------------------------------------------------------------------------------------
# Registry

GATE_FOLLOWING = ("topk-max", "topk-sustainable", "topk-capacity")
LOAD_ONLY = ("random-k", "jsq-k")
BALANCERS = ("bias-uniform", "bias-capacity", "topk-switch")
STABLE_MOE = ("stable-moe", "stable-moe-linear", "stable-moe-sequential", "stable-moe-fixed-freq")
ALL_POLICIES = (
    "stable-moe-linear",
    "stable-moe-sequential",
    "stable-moe-fixed-freq",
    *GATE_FOLLOWING,
    *LOAD_ONLY,
    *BALANCERS,
)
CONTROLLER_NAMES = (*STABLE_MOE, "topk", *GATE_FOLLOWING, *LOAD_ONLY, *BALANCERS)


ControllerFactory = Callable[[NetworkSpec, ControllerSpec, int, float], Controller]
CONTROLLERS: Registry[ControllerFactory] = Registry("controller")
"""Controller name -> factory ``(spec, cfg, seed, bias_rate) -> Controller``."""


def _register(name: str, factory: ControllerFactory) -> None:
    CONTROLLERS.add(name, factory)


for _name in ("stable-moe", "stable-moe-linear", "stable-moe-sequential"):
    _register(_name, lambda spec, cfg, seed, rate: StableMoE(spec, cfg))
_register(
    "stable-moe-fixed-freq", lambda spec, cfg, seed, rate: StableMoE(spec, cfg, freq_rule="sustainable")
)
for _name in ("topk", "topk-max"):
    _register(_name, lambda spec, cfg, seed, rate: TopK(spec, cfg, freq_rule="max"))
_register("topk-sustainable", lambda spec, cfg, seed, rate: TopK(spec, cfg, freq_rule="sustainable"))
_register("topk-capacity", lambda spec, cfg, seed, rate: TopKCapacity(spec, cfg))
_register("random-k", lambda spec, cfg, seed, rate: RandomK(spec, cfg, seed=seed))
_register("jsq-k", lambda spec, cfg, seed, rate: JSQK(spec, cfg, seed=seed))
_register("bias-uniform", lambda spec, cfg, seed, rate: BiasBalance(spec, cfg, "uniform", rate))
_register("bias-capacity", lambda spec, cfg, seed, rate: BiasBalance(spec, cfg, "capacity", rate))
_register("topk-switch", lambda spec, cfg, seed, rate: TopKSwitch(spec, cfg))


def make_controller(name: str, spec: NetworkSpec, **params: Any) -> Controller:
    """Build a controller by name with ``spec.controller`` defaults, overridden by ``params``
    (any :class:`~edgemoe.edge.spec.ControllerSpec` field, plus ``seed`` for ``random-k`` and
    ``jsq-k`` and ``bias_rate`` for the bias balancers).

    Names (:data:`CONTROLLERS`): ``stable-moe`` (routing mode from the spec), ``stable-moe-linear``,
    ``stable-moe-sequential``, ``stable-moe-fixed-freq``, ``topk`` / ``topk-max``,
    ``topk-sustainable``, ``topk-capacity``, ``random-k``, ``jsq-k``, ``bias-uniform``,
    ``bias-capacity``, ``topk-switch``.
    """
    factory = CONTROLLERS.get(name, field="policy")
    seed = int(params.pop("seed", 0))
    bias_rate = float(params.pop("bias_rate", BIAS_RATE))
    if name in ("stable-moe-linear", "stable-moe-sequential"):
        params.setdefault("mode", name.rsplit("-", 1)[1])
    allowed = {f.name for f in dataclasses.fields(ControllerSpec)}
    for key in params:
        if key not in allowed:
            raise ConfigError(f"controller.{key}", f"unknown parameter; allowed are {sorted(allowed)}")
    try:
        cfg = dataclasses.replace(spec.controller, **params)
    except ConfigError as exc:
        raise ConfigError(f"controller.{exc.field}", str(exc).split(": ", 1)[-1]) from None
    ctrl = factory(spec, cfg, seed, bias_rate)
    ctrl.name = name
    return ctrl


def expand_policies(text: str | list[str]) -> list[str]:
    """``"all"`` or a comma-separated list of controller names -> validated list."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(ALL_POLICIES)
    for n in names:
        if n not in CONTROLLER_NAMES:
            raise ConfigError(
                "--policies", f"unknown policy {n!r}; choose 'all' or from {list(CONTROLLER_NAMES)}"
            )
    require(len(names) > 0, "--policies", "name at least one policy")
    return names
