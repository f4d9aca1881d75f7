"""Per-request MoE² routing: the call a gateway makes for every request.

Given the enabled set S (from the coarse level), the request's gate logits, its category's latency
budget and each expert's predicted delay/energy for it, :func:`route_request` returns the experts
to query and their combine weights (fine level: top-k of the enabled experts that fit the budget,
softmax restricted to them). :class:`MoE2Policy` wraps gate, embedder and profiles so a server only
passes the prompt text and category. :func:`aggregate` combines the experts' answer distributions.

**Online energy budget.** An optional :class:`EnergyQueue` (the virtual queue of Lyapunov
drift-plus-penalty control, the device Stable-MoE uses for its servers) keeps the *realised* mean
energy per request within a budget B on any request stream, not only on the questions the enabled
set was chosen on. Its backlog grows by each request's energy minus B, ``Q ← max(Q + e − B, 0)``;
the fine level then keeps, among the experts that fit, the k with the largest
``V·w_n − Q·e_n`` (w = gate weights over the fitting experts, e = predicted energy; the best one
always serves), i.e. it minimises the drift-plus-penalty bound ``Q·e(K) − V·Σ_{n∈K} w_n`` over sets of
at most k experts. With Q = 0 this is the plain top-k. Over T requests the mean energy is at most
B + Q_T/T, and Q stays bounded whenever the cheapest fitting expert costs less than B, so the long-run
mean is within budget; a larger V (in joules; ``v`` × B) trades budget tracking for accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from edgemoe.collab.costs import estimate_prompt_tokens, request_costs
from edgemoe.collab.embed import Embedder
from edgemoe.collab.gate import Gate, restricted_weights, top_k_mask
from edgemoe.collab.profiles import Budgets, CollabConfig
from edgemoe.config import ConfigError, check_choice, check_positive
from edgemoe.errors import InputError


@dataclass
class EnergyQueue:
    """Virtual energy queue (module doc). Stateful: one per request stream.

    ``budget_j``: target mean energy per request (J); ``v``: weight of the gate's preference, in units
    of the budget (V = v·B joules); ``credit_j``: how far the backlog may go below zero (J), so that
    energy saved on cheap requests can be spent later (0 = the plain queue; the mean over T requests
    is then at most B + (Q_T + credit)/T). ``observe(e)`` after each request with its energy.
    """

    budget_j: float
    v: float = 4.0
    credit_j: float = 0.0
    backlog_j: float = 0.0
    requests: int = 0
    energy_j: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.budget_j, "energy_queue.budget_j")
        check_positive(self.v, "energy_queue.v")
        check_positive(self.credit_j, "energy_queue.credit_j", allow_zero=True)

    @property
    def weight_j(self) -> float:
        return self.v * self.budget_j

    def scores(self, weights_N: np.ndarray, energy_N: np.ndarray) -> np.ndarray:
        """Drift-plus-penalty value of serving with each expert: V·w_n − Q·e_n."""
        return self.weight_j * np.asarray(weights_N) - max(self.backlog_j, 0.0) * np.asarray(energy_N)

    def observe(self, energy_j: float) -> None:
        """Account one served request's realised energy (J)."""
        if not math.isfinite(energy_j) or energy_j < 0:
            raise InputError("energy_j", f"must be a finite number >= 0, got {energy_j!r}")
        self.backlog_j = max(self.backlog_j + energy_j - self.budget_j, -self.credit_j)
        self.requests += 1
        self.energy_j += energy_j

    @property
    def mean_energy_j(self) -> float:
        """Realised mean energy per request so far."""
        return self.energy_j / self.requests if self.requests else 0.0


@dataclass
class Route:
    """Which experts serve a request, with what weights, and the predicted delay/energy."""

    experts: list[str]
    weights: list[float]
    delay_s: float
    energy_j: float
    reason: str = "ok"
    logits: list[float] = field(default_factory=list)

    @property
    def served(self) -> bool:
        return bool(self.experts)


def route_request(
    names: list[str],
    logits_N: np.ndarray,
    enabled_N: np.ndarray,
    delay_N: np.ndarray,
    energy_N: np.ndarray,
    latency_budget_s: float,
    aggregation_s: float,
    k: int | None,
    queue: EnergyQueue | None = None,
    weight_logits_N: np.ndarray | None = None,
) -> Route:
    """Fine-level routing of one request (see module doc). No fitting expert → an empty route.

    ``queue`` prices energy into the top-k choice (it is read, not updated: call ``queue.observe``
    with the energy really spent). ``weight_logits_N`` (a calibrated gate's) set the combine weights;
    the ranking uses ``logits_N``.
    """
    enabled_N = np.asarray(enabled_N, dtype=bool)
    logits_N = np.asarray(logits_N, dtype=np.float64)
    fits_N = enabled_N & (np.asarray(delay_N) + aggregation_s <= latency_budget_s)
    if not fits_N.any():
        reason = "no enabled expert" if not enabled_N.any() else "no enabled expert fits the latency budget"
        return Route([], [], 0.0, 0.0, reason, logits=[float(x) for x in logits_N])
    rank_N = logits_N
    if queue is not None and queue.backlog_j > 0:
        w_all_N = restricted_weights(logits_N[None, :], fits_N[None, :])[0]
        rank_N = queue.scores(w_all_N, np.asarray(energy_N, dtype=np.float64))
        keep_N = top_k_mask(rank_N[None, :], fits_N[None, :], k)[0]
        best = int(np.argmax(np.where(fits_N, rank_N, -np.inf)))
        keep_N &= rank_N > 0
        keep_N[best] = True
        fits_N, k = keep_N, None
    wl_N = logits_N if weight_logits_N is None else np.asarray(weight_logits_N, dtype=np.float64)
    sel_N = top_k_mask(logits_N[None, :], fits_N[None, :], k)[0]
    w_N = restricted_weights(wl_N[None, :], sel_N[None, :])[0]
    chosen = np.flatnonzero(w_N > 0)
    chosen = chosen[np.argsort(-w_N[chosen], kind="stable")]
    return Route(
        experts=[names[i] for i in chosen],
        weights=[float(w_N[i]) for i in chosen],
        delay_s=float(np.max(np.asarray(delay_N)[chosen]) + aggregation_s),
        energy_j=float(np.sum(np.asarray(energy_N)[chosen])),
        logits=[float(x) for x in logits_N],
    )


def aggregate(probs_KO: np.ndarray, weights_K: np.ndarray) -> np.ndarray:
    """Gate-weighted mixture of the routed experts' answer distributions (uniform if none served)."""
    probs_KO = np.asarray(probs_KO, dtype=np.float64)
    if probs_KO.shape[0] == 0:
        return np.full(probs_KO.shape[1], 1.0 / probs_KO.shape[1])
    w_K = np.asarray(weights_K, dtype=np.float64)
    return (w_K[:, None] * probs_KO).sum(axis=0) / w_K.sum()


def trim_to_energy(route: Route, energy_N: np.ndarray, names: list[str], budget_j: float) -> Route:
    """Keep a route's experts in descending weight while the set's predicted energy fits
    ``budget_j``; weights renormalised over the kept ones (empty route when none fits)."""
    energy = dict(zip(names, np.asarray(energy_N, dtype=np.float64)))
    kept: list[tuple[str, float]] = []
    spent = 0.0
    for name, weight in zip(route.experts, route.weights):
        if spent + energy[name] <= budget_j:
            kept.append((name, weight))
            spent += energy[name]
    if not kept:
        return Route([], [], 0.0, 0.0, "no expert set fits the energy budget", route.logits)
    total = sum(w for _, w in kept)
    return dataclasses.replace(
        route, experts=[n for n, _ in kept], weights=[w / total for _, w in kept], energy_j=spent
    )


class MoE2Policy:
    """Gate + embedder + profiles + enabled set: what offline evaluation and the gateway call for
    every request (the same :meth:`route`).

    Interface (stable; the gateway builds on it):

    - ``MoE2Policy(config, gate, embedder, enabled, energy_queue=None)``; ``enabled`` are expert
      names (the coarse level's choice); without a gate (``gate=None``) every enabled expert has the
      same logit (uniform weights); ``energy_queue`` (optional, stateful) keeps the realised mean
      energy per request within its budget on this policy's request stream (module doc).
    - ``route(prompt, category, prompt_tokens=None, budgets=None, *, gate_text, output_tokens,
      latency_budget_s, energy_budget_j, top_k, available) -> Route``: the experts to query, their
      combine weights, predicted delay and energy. ``output_tokens`` defaults to the category's
      ``request.output_tokens_by_category`` entry, else ``request.output_tokens``.
    - ``costs(prompt_tokens, output_tokens)``: per-expert predicted delay, energy, aggregation time.
    - ``observe(energy_j)``: after serving a route, the energy really spent (``route.energy_j`` or a
      measurement); it feeds the energy queue and is a no-op without one.
    - ``aggregate(probs_KO, weights_K)`` (module function) combines the experts' distributions.
    """

    def __init__(
        self,
        config: CollabConfig,
        gate: Gate | None,
        embedder: Embedder | None,
        enabled: list[str],
        energy_queue: EnergyQueue | None = None,
    ):
        if gate is not None and gate.experts != config.expert_names:
            raise ConfigError(
                "gate", f"gate experts {gate.experts} differ from config experts {config.expert_names}"
            )
        for name in enabled:
            check_choice(name, "enabled", config.expert_names)
        if gate is not None and (embedder is None or embedder.dim != gate.embed_dim):
            got = "no embedder" if embedder is None else f"{embedder.dim}-d vectors"
            raise ConfigError("embedder", f"gives {got} but the gate expects {gate.embed_dim}-d")
        self.config = config
        self.gate = gate
        self.embedder = embedder
        self.enabled_N = np.array([n in enabled for n in config.expert_names])
        self.energy_queue = energy_queue
        self._costs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]] = {}

    def costs(self, prompt_tokens: int, output_tokens: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-expert predicted delay (s), energy (J) and the aggregation time for one request."""
        key = (prompt_tokens, output_tokens)
        if key not in self._costs:
            if len(self._costs) > 4096:
                self._costs.clear()
            c = request_costs(
                self.config.experts,
                np.array([prompt_tokens]),
                self.config.request,
                np.array([output_tokens]),
            )
            self._costs[key] = (c.delay_QN[0], c.energy_QN[0], c.aggregation_s)
        return self._costs[key]

    def logits(self, text: str, category: str) -> np.ndarray:
        if self.gate is None or self.embedder is None:
            return np.zeros(len(self.config.expert_names))
        cat = np.array([self.config.categories.index(category)])
        return self.gate.logits(self.embedder.encode([text]), cat)[0]

    def route(
        self,
        prompt: str,
        category: str,
        prompt_tokens: int | None = None,
        budgets: Budgets | None = None,
        *,
        gate_text: str | None = None,
        output_tokens: int | None = None,
        latency_budget_s: float | None = None,
        energy_budget_j: float | None = None,
        top_k: int | None = None,
        available: Collection[str] | None = None,
    ) -> Route:
        """Fine-level routing of one request.

        The optional keywords are a served request's own settings: ``gate_text`` (what the gate
        embeds, default ``prompt``), its output length, latency and energy budgets, top-k, and
        ``available`` (experts that can answer now; default all).
        """
        check_choice(category, "category", self.config.categories)
        budgets = budgets or self.config.budgets
        names = self.config.expert_names
        tokens = prompt_tokens if prompt_tokens is not None else int(estimate_prompt_tokens([prompt])[0])
        out = output_tokens if output_tokens is not None else self.config.request.output_tokens_for(category)
        delay_N, energy_N, aggregation_s = self.costs(tokens, out)
        enabled_N = self.enabled_N.copy()
        if available is not None:
            enabled_N &= np.array([n in available for n in names])
        if energy_budget_j is not None:
            enabled_N &= energy_N <= energy_budget_j
        route = route_request(
            names,
            self.logits(gate_text or prompt, category),
            enabled_N,
            delay_N,
            energy_N,
            latency_budget_s if latency_budget_s is not None else budgets.latency_for(category),
            aggregation_s,
            top_k or self.config.top_k,
            queue=self.energy_queue,
        )
        if energy_budget_j is not None and route.served:
            route = trim_to_energy(route, energy_N, names, energy_budget_j)
        return route

    def observe(self, energy_j: float) -> None:
        """Record the energy one served request really used (feeds the energy queue, if any)."""
        if self.energy_queue is not None:
            self.energy_queue.observe(energy_j)
