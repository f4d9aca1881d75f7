"""Delay and energy model of MoE² (pure numpy).

For request q and expert n:
  transmission_qn = 2·rtt_n + 8·(prompt_tokens_q·bytes_per_token + response_bytes) / (link_mbps_n·1e6)
  compute_qn      = fixed_n + prompt_tokens_q·s_prompt_n + output_tokens_q·s_output_n
  delay_qn        = transmission_qn + compute_qn
  energy_qn       = power_n·compute_qn + tx_power_n·transmission_qn      (power × busy time)
A request served by the set K (experts run in parallel) takes max_{n∈K} delay_qn + aggregation and
costs Σ_{n∈K} energy_qn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.collab.profiles import Budgets, ExpertProfile, RequestModel


@dataclass
class RequestCosts:
    """Per-request, per-expert delay (s) and energy (J), shapes (Q, N)."""

    delay_QN: np.ndarray
    energy_QN: np.ndarray
    aggregation_s: float

    def set_delay(self, mask_QN: np.ndarray) -> np.ndarray:
        """Delay of each request served by the experts in ``mask_QN`` (0 when none serves it)."""
        mask_QN = np.broadcast_to(mask_QN, self.delay_QN.shape)
        served_Q = mask_QN.any(axis=1)
        slowest_Q = np.where(mask_QN, self.delay_QN, 0.0).max(axis=1)
        return np.where(served_Q, slowest_Q + self.aggregation_s, 0.0)

    def set_energy(self, mask_QN: np.ndarray) -> np.ndarray:
        """Energy of each request served by the experts in ``mask_QN``."""
        mask_QN = np.broadcast_to(mask_QN, self.energy_QN.shape)
        return np.where(mask_QN, self.energy_QN, 0.0).sum(axis=1)


def expert_rates(experts: list[ExpertProfile]) -> dict[str, np.ndarray]:
    """Per-expert constants of the delay/energy model, as arrays of shape (N,)."""
    return {
        "s_prompt_N": np.array([e.seconds_per_prompt_token for e in experts]),
        "s_output_N": np.array([e.seconds_per_output_token for e in experts]),
        "fixed_N": np.array([e.fixed_latency_s for e in experts]),
        "power_N": np.array([e.power for e in experts]),
        "tx_power_N": np.array([e.tx_power_w for e in experts]),
        "link_bps_N": np.array([e.link_mbps * 1e6 for e in experts]),
        "rtt_N": np.array([e.link_rtt_s for e in experts]),
    }


def request_costs(
    experts: list[ExpertProfile],
    prompt_tokens_Q: np.ndarray,
    request: RequestModel,
    output_tokens_Q: np.ndarray | None = None,
) -> RequestCosts:
    """Delay and energy of every (request, expert) pair from the profiles (closed form above)."""
    r = expert_rates(experts)
    prompt_Q = np.asarray(prompt_tokens_Q, dtype=np.float64)
    out_Q = (
        np.full_like(prompt_Q, float(request.output_tokens))
        if output_tokens_Q is None
        else np.asarray(output_tokens_Q, dtype=np.float64)
    )
    bits_Q = 8.0 * (prompt_Q * request.bytes_per_token + request.response_bytes)
    tx_QN = 2.0 * r["rtt_N"][None, :] + bits_Q[:, None] / r["link_bps_N"][None, :]
    compute_QN = (
        r["fixed_N"][None, :]
        + prompt_Q[:, None] * r["s_prompt_N"][None, :]
        + out_Q[:, None] * r["s_output_N"][None, :]
    )
    delay_QN = tx_QN + compute_QN
    energy_QN = r["power_N"][None, :] * compute_QN + r["tx_power_N"][None, :] * tx_QN
    return RequestCosts(delay_QN, energy_QN, request.aggregation_s)


def with_measurements(
    costs: RequestCosts, latency_QN: np.ndarray | None, energy_QN: np.ndarray | None
) -> RequestCosts:
    """Replace modelled figures by measured ones wherever a measurement exists (non-NaN)."""
    delay = (
        costs.delay_QN if latency_QN is None else np.where(np.isnan(latency_QN), costs.delay_QN, latency_QN)
    )
    energy = (
        costs.energy_QN if energy_QN is None else np.where(np.isnan(energy_QN), costs.energy_QN, energy_QN)
    )
    return RequestCosts(delay, energy, costs.aggregation_s)


def latency_budget_Q(budgets: Budgets, categories: list[str], category_Q: np.ndarray) -> np.ndarray:
    """Each request's latency budget (s) from its category index."""
    per_cat = np.array([budgets.latency_for(c) for c in categories])
    return per_cat[np.asarray(category_Q)]


def eligible_QN(costs: RequestCosts, budget_Q: np.ndarray) -> np.ndarray:
    """Expert n may serve request q iff its delay plus aggregation fits q's latency budget."""
    return costs.delay_QN + costs.aggregation_s <= budget_Q[:, None]


def estimate_prompt_tokens(texts: list[str]) -> np.ndarray:
    """A tokenizer-free estimate (≈ 4 characters per token, at least one)."""
    return np.array([max(1, round(len(t) / 4)) for t in texts], dtype=np.int64)
