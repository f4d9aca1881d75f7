"""Reference solver of Stable-MoE's per-slot problem with generic solvers, for tests and benchmarks.

Routing is solved as a mixed-integer program with ``scipy.optimize.milp``; each server's frequency by
bounded scalar minimisation (``scipy.optimize.minimize_scalar``). :func:`slot_objective` evaluates the
drift-plus-penalty bound of any decision, so the closed form and the solver can be compared on value.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, sparse

from edgemoe.edge.controllers import Decision, energy_weight_E, frequency_bounds
from edgemoe.edge.spec import ControllerSpec, NetworkSpec
from edgemoe.edge.state import NetworkState


def frequency_objective_E(
    spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec, freq_E: np.ndarray
) -> np.ndarray:
    """Per-server frequency part of the bound: beta Z (kappa f^3 tau - E^max) - (Q + V omega1) f tau / C."""
    beta = energy_weight_E(spec, cfg.energy_weight)
    pressure = state.backlog_E + cfg.V * cfg.omega1
    energy_term = beta * state.energy_queue_E * (spec.energy_E(freq_E) - spec.budget_E)
    return energy_term - pressure * spec.capacity_E(freq_E)


def routing_costs_NE(state: NetworkState, cfg: ControllerSpec, scores_NE: np.ndarray) -> np.ndarray:
    """Cost of assigning token i to server j: Q_j - V omega2 g_ij."""
    return state.backlog_E[None, :] - cfg.V * cfg.omega2 * np.asarray(scores_NE, dtype=np.float64)


def slot_objective(
    spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec, scores_NE: np.ndarray, decision: Decision
) -> float:
    """Drift-plus-penalty bound of ``decision`` (the quantity Stable-MoE minimises each slot)."""
    costs_NE = routing_costs_NE(state, cfg, scores_NE)
    routing = np.take_along_axis(costs_NE, decision.expert_ids_NK, axis=1)[decision.kept_mask()].sum()
    return float(routing + frequency_objective_E(spec, state, cfg, decision.freq_E).sum())


def solve_routing_milp(
    state: NetworkState, cfg: ControllerSpec, scores_NE: np.ndarray, k: int, time_limit: float | None = None
) -> np.ndarray:
    """Routing by MILP: binary x_ij, sum_j x_ij = K, x_ij = 0 for offline j, minimise sum x_ij cost_ij."""
    costs_NE = routing_costs_NE(state, cfg, scores_NE)
    N, E = costs_NE.shape
    rows = np.repeat(np.arange(N), E)
    A = sparse.csr_array((np.ones(N * E), (rows, np.arange(N * E))), shape=(N, N * E))
    upper = np.tile(state.online_E.astype(np.float64), N)
    options = {"time_limit": time_limit} if time_limit else {}
    res = optimize.milp(
        costs_NE.ravel(),
        constraints=optimize.LinearConstraint(A, k, k),
        integrality=np.ones(N * E),
        bounds=optimize.Bounds(0.0, upper),
        options=options,
    )
    if res.x is None:
        raise RuntimeError(f"reference MILP failed: {res.message}")
    x_NE = np.rint(res.x).reshape(N, E).astype(bool)
    # Each row has exactly k ones; sorting by the column index keeps the k chosen ids per row.
    return np.sort(np.nonzero(x_NE)[1].reshape(N, k), axis=1)


def solve_frequency_scalar(spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec) -> np.ndarray:
    """Frequency by bounded scalar minimisation per server on [lo, hi] (normalised to [0, 1])."""
    lo, hi = frequency_bounds(spec, state)
    freq_E = lo.copy()
    for j in map(int, np.nonzero(hi > lo)[0]):

        def objective(u: float, j: int = j) -> float:
            f = np.zeros(spec.num_servers)
            f[j] = lo[j] + u * (hi[j] - lo[j])
            return float(frequency_objective_E(spec, state, cfg, f)[j])

        res = optimize.minimize_scalar(
            objective, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}
        )
        # Brent's bounded search never evaluates the end points themselves; compare with them.
        candidates = [res.x, 0.0, 1.0]
        best = min(candidates, key=objective)
        freq_E[j] = lo[j] + best * (hi[j] - lo[j])
    return freq_E


def solve_reference(
    spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec, scores_NE: np.ndarray
) -> Decision:
    """The per-slot optimum found by generic solvers (MILP routing, scalar frequency search)."""
    ids_NK = solve_routing_milp(state, cfg, scores_NE, spec.k)
    return Decision(ids_NK, solve_frequency_scalar(spec, state, cfg))
