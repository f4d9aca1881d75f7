"""Per-request MoE² routing: the call a gateway makes for every request.

Given the enabled set S (from the coarse level), the request's gate logits, its category's latency
budget and each expert's predicted delay/energy for it, :func:`route_request` returns the experts
to query and their combine weights (fine level: top-k of the enabled experts that fit the budget,
softmax restricted to them). :class:`MoE2Policy` wraps gate, embedder and profiles so a server only
passes the prompt text and category. :func:`aggregate` combines the experts' answer distributions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemoe.collab.costs import request_costs
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


class MoE2Policy:
    """Gate + embedder + profiles + enabled set: ``route(prompt, category)`` for a server."""

    def __init__(self, config: CollabConfig, gate: Gate, embedder: Embedder, enabled: list[str]):
        if gate.experts != config.expert_names:
            raise ConfigError(
                "gate", f"gate experts {gate.experts} differ from config experts {config.expert_names}"
            )
        for name in enabled:
            check_choice(name, "enabled", config.expert_names)
        if embedder.dim != gate.embed_dim:
            raise ConfigError(
                "embedder", f"gives {embedder.dim}-d vectors but the gate expects {gate.embed_dim}"
            )
        self.config = config
        self.gate = gate
        self.embedder = embedder
        self.enabled_N = np.array([n in enabled for n in config.expert_names])

    def route(
        self, prompt: str, category: str, prompt_tokens: int | None = None, budgets: Budgets | None = None
    ) -> Route:
        check_choice(category, "category", self.config.categories)
        budgets = budgets or self.config.budgets
        tokens = prompt_tokens if prompt_tokens is not None else max(1, round(len(prompt) / 4))
        costs = request_costs(self.config.experts, np.array([tokens]), self.config.request)
        emb = self.embedder.encode([prompt])
        cat = np.array([self.config.categories.index(category)])
        logits_N = self.gate.logits(emb, cat)[0]
        return route_request(
            self.config.expert_names,
            logits_N,
            self.enabled_N,
            costs.delay_QN[0],
            costs.energy_QN[0],
            budgets.latency_for(category),
            costs.aggregation_s,
            self.config.top_k,
        )
