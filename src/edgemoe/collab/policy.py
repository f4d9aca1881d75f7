"""Per-request MoE² routing: the call a gateway makes for every request.

Given the enabled set S (from the coarse level), the request's gate logits, its category's latency
budget and each expert's predicted delay/energy for it, :func:`route_request` returns the experts
to query and their combine weights (fine level: top-k of the enabled experts that fit the budget,
softmax restricted to them). :class:`MoE2Policy` wraps gate, embedder and profiles so a server only
passes the prompt text and category. :func:`aggregate` combines the experts' answer distributions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from edgemoe.collab.costs import estimate_prompt_tokens, request_costs
from edgemoe.collab.embed import Embedder
from edgemoe.collab.gate import Gate, route_weights
from edgemoe.collab.profiles import Budgets, CollabConfig
from edgemoe.config import ConfigError, check_choice


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
) -> Route:
    """Fine-level routing of one request (see module doc). No fitting expert → an empty route."""
    enabled_N = np.asarray(enabled_N, dtype=bool)
    fits_N = enabled_N & (np.asarray(delay_N) + aggregation_s <= latency_budget_s)
    if not fits_N.any():
        reason = "no enabled expert" if not enabled_N.any() else "no enabled expert fits the latency budget"
        return Route([], [], 0.0, 0.0, reason, logits=[float(x) for x in logits_N])
    w_N = route_weights(np.asarray(logits_N, dtype=np.float64)[None, :], fits_N[None, :], k)[0]
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
    """Gate + embedder + profiles + enabled set: ``route(prompt, category)`` for a server.

    Offline evaluation and the gateway call the same :meth:`route`. Without a gate (``gate=None``)
    every enabled expert has the same logit (uniform weights).
    """

    def __init__(
        self, config: CollabConfig, gate: Gate | None, embedder: Embedder | None, enabled: list[str]
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
        self._costs: dict[tuple[int, int | None], tuple[np.ndarray, np.ndarray, float]] = {}

    def costs(
        self, prompt_tokens: int, output_tokens: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-expert predicted delay (s), energy (J) and the aggregation time for one request."""
        key = (prompt_tokens, output_tokens)
        if key not in self._costs:
            if len(self._costs) > 4096:
                self._costs.clear()
            request = self.config.request
            if output_tokens is not None:
                request = dataclasses.replace(request, output_tokens=output_tokens)
            c = request_costs(self.config.experts, np.array([prompt_tokens]), request)
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
        delay_N, energy_N, aggregation_s = self.costs(tokens, output_tokens)
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
        )
        if energy_budget_j is not None and route.served:
            route = trim_to_energy(route, energy_N, names, energy_budget_j)
        return route
