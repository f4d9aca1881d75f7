"""The coarse-level selection problem and its vectorised objective.

For an enabled set S, request q is served by R_q(S) = the top-k (by gate logit) of the experts of S
that fit q's latency budget (all of them when k is None), combined with the gate softmax restricted
to R_q(S). The objective is the mean over questions of

- ``accuracy``: 1[argmax of the mixture = correct option], with a 1e-7 × log-likelihood tie-break,
- ``log_likelihood``: log of the mixture's probability of the correct option (= −cross-entropy),
  floored at log 1e-13 per question.

With correctness-only data (``correctness_only``: each expert's probability of being right, no
option distribution) "accuracy" is the expected accuracy: the mean over questions of the mixture's
probability of the correct answer, i.e. the gate-weighted mean of the experts'.

A request no enabled expert can serve in time counts as wrong with likelihood 1/O.

Energy (our choice, documented in docs/moe2.md): the coarse level reserves, per request, the energy
of every enabled expert that may serve it, E(S) = Σ_{n∈S} ē_n with ē_n = mean_q energy_qn·1[n fits q].
It is additive, so feasibility is down-closed, and the fine level's top-k spends at most that. With a
top-k fine level, ``energy="routed"`` budgets instead the mean energy of the experts really routed,
E(S) = mean_q Σ_{n∈R_q(S)} energy_qn (not additive: the online energy queue of the policy keeps it
on a request stream). Latency holds per request by construction (only experts that fit serve).

Restricted gate weights are exact at any logit gap: mixtures are summed with weights relative to the
best eligible expert of each question, and any (set, question) whose routed weights underflow there
is recomputed with the softmax restricted to its own routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemoe.collab.cache import AnswerCache
from edgemoe.collab.costs import RequestCosts, eligible_QN
from edgemoe.config import ConfigError, check_choice

TIE_EPS = 1e-7
# Per-question likelihoods are floored so that TIE_EPS × |log-likelihood| ≤ 3e-6 stays below one
# question's worth of accuracy for up to 300 000 questions (the tie-break never outranks accuracy).
P_FLOOR = 1e-13
OBJECTIVES = ("accuracy", "log_likelihood")
ENERGY_MODES = ("reserved", "routed")
# Below this normaliser a mixture is recomputed with its own restricted softmax (gap > ~575 nats).
UNDERFLOW = 1e-250


@dataclass
class Evaluation:
    """Objective components for a batch of subsets (arrays of shape (B,))."""

    value_B: np.ndarray
    accuracy_B: np.ndarray
    loglik_B: np.ndarray


@dataclass
class SelectionProblem:
    """Arrays that define one coarse-level instance (one latency-budget setting, many energy budgets)."""

    names: list[str]
    probs_QNO: np.ndarray
    answer_Q: np.ndarray
    logits_QN: np.ndarray
    eligible_QN: np.ndarray
    energy_QN: np.ndarray
    delay_QN: np.ndarray
    category_Q: np.ndarray
    aggregation_s: float = 0.0
    top_k: int | None = None
    objective: str = "accuracy"
    correctness_only: bool = False
    energy_mode: str = "reserved"
    weight_logits_QN: np.ndarray | None = None
    gate_QN: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice(self.objective, "objective", OBJECTIVES)
        check_choice(self.energy_mode, "energy", ENERGY_MODES)
        q, n, o = self.probs_QNO.shape
        for name in ("logits_QN", "eligible_QN", "energy_QN", "delay_QN"):
            if getattr(self, name).shape != (q, n):
                raise ConfigError(name, f"shape {getattr(self, name).shape} must be ({q}, {n})")
        if len(self.names) != n:
            raise ConfigError("names", f"{len(self.names)} names for {n} experts")
        if np.any(self.energy_QN < 0):
            raise ConfigError("energy_QN", "energies must be >= 0")
        self.eligible_QN = np.asarray(self.eligible_QN, dtype=bool)
        if self.top_k is not None and self.top_k >= n:
            self.top_k = None
        # Combine weights may come from other logits than the top-k ranking (a calibrated gate).
        self.combine_QN: np.ndarray = (
            self.logits_QN if self.weight_logits_QN is None else self.weight_logits_QN
        )
        # Unnormalised gate weights, scaled so the best eligible expert of each question has 1.
        self.gate_QN = _scaled_weights(self.combine_QN, self.eligible_QN)
        rows = np.arange(q)
        self.correct_QN = self.probs_QNO[rows, :, self.answer_Q]
        self.gp_NQO = np.ascontiguousarray((self.gate_QN[:, :, None] * self.probs_QNO).transpose(1, 0, 2))
        self.gate_NQ = np.ascontiguousarray(self.gate_QN.T)
        self.cost_N = (self.energy_QN * self.eligible_QN).mean(axis=0)
        # Reserved energy is additive (feasibility is down-closed); routed energy under top-k is not.
        self.additive = self.top_k is None or self.energy_mode == "reserved"
        self.usable_N: np.ndarray = np.asarray(self.eligible_QN.any(axis=0))
        # Sorted-by-logit views for the top-k fine level (eligible experts first).
        order_QN = np.argsort(-np.where(self.eligible_QN, self.logits_QN, -np.inf), axis=1, kind="stable")
        self.rank_order_QN = order_QN
        self.gate_sorted_QN = np.take_along_axis(self.gate_QN, order_QN, axis=1)
        self.eligible_sorted_QN = np.take_along_axis(self.eligible_QN, order_QN, axis=1)
        self.gp_sorted_QNO = np.take_along_axis(
            self.gate_QN[:, :, None] * self.probs_QNO, order_QN[:, :, None], 1
        )

    @property
    def num_experts(self) -> int:
        return len(self.names)

    @property
    def num_questions(self) -> int:
        return int(self.probs_QNO.shape[0])

    @property
    def num_options(self) -> int:
        return int(self.probs_QNO.shape[2])

    def energy(self, mask_N: np.ndarray) -> float:
        """Budgeted mean energy per request of the enabled set (J): reserved, or routed (module doc)."""
        return float(self.energies(np.asarray(mask_N, dtype=bool)[None])[0])

    def energies(self, masks_BN: np.ndarray) -> np.ndarray:
        """:meth:`energy` of a batch of sets, shape (B,)."""
        masks_BN = np.atleast_2d(np.asarray(masks_BN, dtype=bool))
        if self.additive:
            return masks_BN.astype(np.float64) @ self.cost_N
        energy_sorted_QN = np.take_along_axis(self.energy_QN, self.rank_order_QN, axis=1)
        sel_BQN = self._sorted_selection(masks_BN)
        return np.einsum("bqn,qn->b", sel_BQN.astype(np.float64), energy_sorted_QN) / self.num_questions

    def _sorted_selection(self, masks_BN: np.ndarray) -> np.ndarray:
        """R_q(S) in per-question logit order (bool (B, Q, N)); top-k keeps the first k."""
        sel_BQN = np.asarray(masks_BN, dtype=bool)[:, self.rank_order_QN]
        sel_BQN &= self.eligible_sorted_QN[None]
        if self.top_k is not None:
            sel_BQN &= np.cumsum(sel_BQN, axis=2) <= self.top_k
        return sel_BQN

    def routed_QN(self, mask_N: np.ndarray) -> np.ndarray:
        """R_q(S) for one subset, bool (Q, N) in the original expert order."""
        sel_QN = self._sorted_selection(np.asarray(mask_N, dtype=bool)[None])[0]
        out_QN = np.zeros_like(sel_QN)
        np.put_along_axis(out_QN, self.rank_order_QN, sel_QN, axis=1)
        return out_QN

    def mixtures(self, masks_BN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unnormalised mixtures ``num_BQO`` and their normalisers ``den_BQ`` for a batch of subsets."""
        masks_BN = np.asarray(masks_BN)
        b = masks_BN.shape[0]
        q, n, o = self.probs_QNO.shape
        if self.top_k is None:
            m = masks_BN.astype(np.float64)
            num = (m @ self.gp_NQO.reshape(n, q * o)).reshape(b, q, o)
            return num, m @ self.gate_NQ
        s = self._sorted_selection(masks_BN).astype(np.float64)
        return np.einsum("bqn,qno->bqo", s, self.gp_sorted_QNO), np.einsum(
            "bqn,qn->bq", s, self.gate_sorted_QN
        )

    def served(self, masks_BN: np.ndarray) -> np.ndarray:
        """Whether some enabled expert fits each question, bool (B, Q)."""
        return (np.asarray(masks_BN, dtype=np.float64) @ self.eligible_QN.T.astype(np.float64)) > 0

    def restabilise(
        self, num_BQO: np.ndarray, den_BQ: np.ndarray, masks_BN: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Recompute, with their own restricted softmax, the mixtures whose weights underflowed."""
        bad_BQ = (den_BQ < UNDERFLOW) & self.served(masks_BN)
        if not bad_BQ.any():
            return num_BQO, den_BQ
        b_K, q_K = np.nonzero(bad_BQ)
        order_KN = self.rank_order_QN[q_K]
        sel_KN = np.asarray(masks_BN, dtype=bool)[b_K[:, None], order_KN] & self.eligible_sorted_QN[q_K]
        if self.top_k is not None:
            sel_KN &= np.cumsum(sel_KN, axis=1) <= self.top_k
        z_KN = np.where(sel_KN, np.take_along_axis(self.combine_QN[q_K], order_KN, axis=1), -np.inf)
        w_KN = np.where(sel_KN, np.exp(z_KN - z_KN.max(axis=1, keepdims=True)), 0.0)
        probs_KNO = np.take_along_axis(self.probs_QNO[q_K], order_KN[:, :, None], axis=1)
        num_BQO, den_BQ = num_BQO.copy(), den_BQ.copy()
        num_BQO[b_K, q_K] = np.einsum("kn,kno->ko", w_KN, probs_KNO)
        den_BQ[b_K, q_K] = w_KN.sum(axis=1)
        return num_BQO, den_BQ

    def score(
        self, num_BQO: np.ndarray, den_BQ: np.ndarray, masks_BN: np.ndarray | None = None
    ) -> Evaluation:
        """Objective of mixtures (see module doc); ``masks_BN`` lets underflowed mixtures be recomputed."""
        if masks_BN is not None:
            num_BQO, den_BQ = self.restabilise(num_BQO, den_BQ, masks_BN)
        rows = np.arange(self.num_questions)
        served_BQ = den_BQ > 0
        correct_BQ = (num_BQO.argmax(axis=2) == self.answer_Q[None, :]) & served_BQ
        p_y_BQ = num_BQO[:, rows, self.answer_Q] / np.where(served_BQ, den_BQ, 1.0)
        p_y_BQ = np.where(served_BQ, p_y_BQ, 1.0 / self.num_options)
        ll_B = np.log(np.maximum(p_y_BQ, P_FLOOR)).mean(axis=1)
        # An unserved request is wrong (its likelihood is a uniform guess's).
        acc_B = (
            np.where(served_BQ, p_y_BQ, 0.0).mean(axis=1)
            if self.correctness_only
            else correct_BQ.mean(axis=1)
        )
        value_B = acc_B + TIE_EPS * ll_B if self.objective == "accuracy" else ll_B
        return Evaluation(value_B, acc_B, ll_B)

    def evaluate(self, masks_BN: np.ndarray, chunk: int = 256) -> Evaluation:
        """Objective of every subset in ``masks_BN`` (bool (B, N)), in chunks."""
        masks_BN = np.atleast_2d(np.asarray(masks_BN, dtype=bool))
        parts = [
            self.score(*self.mixtures(masks_BN[i : i + chunk]), masks_BN[i : i + chunk])
            for i in range(0, len(masks_BN), chunk)
        ]
        if not parts:
            empty = np.zeros(0)
            return Evaluation(empty, empty, empty)
        return Evaluation(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("value_B", "accuracy_B", "loglik_B"))
        )

    def realised(self, mask_N: np.ndarray, categories: list[str] | None = None) -> dict:
        """What serving with S really costs and achieves: accuracy, mean energy, latency per category."""
        mask_N = np.asarray(mask_N, dtype=bool)
        ev = self.evaluate(mask_N[None])
        routed_QN = self.routed_QN(mask_N)
        costs = RequestCosts(self.delay_QN, self.energy_QN, self.aggregation_s)
        delay_Q = costs.set_delay(routed_QN)
        served_Q = routed_QN.any(axis=1)
        cats = sorted(set(self.category_Q.tolist()))
        lat = {}
        for c in cats:
            sel_c = (self.category_Q == c) & served_Q
            lat[categories[c] if categories else str(c)] = {
                "mean_s": float(delay_Q[sel_c].mean()) if sel_c.any() else 0.0,
                "max_s": float(delay_Q[sel_c].max()) if sel_c.any() else 0.0,
            }
        return {
            "accuracy": float(ev.accuracy_B[0]),
            "log_likelihood": float(ev.loglik_B[0]),
            "energy_reserved_j": float(self.cost_N @ mask_N),
            "energy_budgeted_j": self.energy(mask_N),
            "energy_realised_j": float(costs.set_energy(routed_QN).mean()),
            "served_fraction": float(served_Q.mean()),
            "experts_per_request": float(routed_QN.sum(axis=1).mean()),
            "latency": lat,
        }


def _scaled_weights(logits_QN: np.ndarray, eligible_QN: np.ndarray) -> np.ndarray:
    """exp(logit − best eligible logit) on eligible experts, 0 elsewhere (the best gets 1)."""
    top_Q = np.where(eligible_QN, logits_QN, -np.inf).max(axis=1, keepdims=True)
    z_QN = logits_QN - np.where(np.isfinite(top_Q), top_Q, 0.0)
    return np.where(eligible_QN, np.exp(np.minimum(z_QN, 0.0)), 0.0)


def build_problem(
    cache: AnswerCache,
    answer_Q: np.ndarray,
    category_Q: np.ndarray,
    logits_QN: np.ndarray,
    costs: RequestCosts,
    latency_budget_Q: np.ndarray,
    top_k: int | None = None,
    objective: str = "accuracy",
    correctness_only: bool = False,
    energy_mode: str = "reserved",
    weight_logits_QN: np.ndarray | None = None,
) -> SelectionProblem:
    """Assemble a :class:`SelectionProblem` from a cache, gate logits, costs and latency budgets."""
    return SelectionProblem(
        names=list(cache.experts),
        probs_QNO=cache.probs_QNO,
        answer_Q=np.asarray(answer_Q),
        logits_QN=np.asarray(logits_QN, dtype=np.float64),
        eligible_QN=eligible_QN(costs, np.asarray(latency_budget_Q, dtype=np.float64)),
        energy_QN=costs.energy_QN,
        delay_QN=costs.delay_QN,
        category_Q=np.asarray(category_Q),
        aggregation_s=costs.aggregation_s,
        top_k=top_k,
        objective=objective,
        correctness_only=correctness_only,
        energy_mode=energy_mode,
        weight_logits_QN=weight_logits_QN,
    )
