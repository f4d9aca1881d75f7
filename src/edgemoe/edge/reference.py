"""Reference solver of Stable-MoE's per-slot problem with generic solvers, for tests and benchmarks.

Routing is solved as a mixed-integer program with ``scipy.optimize.milp``; each server's frequency by
bounded scalar minimisation (``scipy.optimize.minimize_scalar``). :func:`slot_objective` evaluates the
drift-plus-penalty bound of any decision, so the closed form and the solver can be compared on value.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, sparse

from edgemoe.edge.controllers import Decision, energy_weight_J, frequency_bounds
from edgemoe.edge.spec import ControllerSpec, NetworkSpec
from edgemoe.edge.state import NetworkState


def frequency_objective_J(
    spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec, freq_J: np.ndarray
) -> np.ndarray:
    """Per-server frequency part of the bound: beta Z (kappa f^3 tau - E^max) - (Q + V omega1) f tau / C."""
    beta = energy_weight_J(spec, cfg.energy_weight)
    pressure = state.backlog_J + cfg.V * cfg.omega1
    energy_term = beta * state.energy_queue_J * (spec.energy_J(freq_J) - spec.budget_J)
    return energy_term - pressure * spec.capacity_J(freq_J)


def routing_costs_NJ(state: NetworkState, cfg: ControllerSpec, scores_NJ: np.ndarray) -> np.ndarray:
    """Cost of assigning token i to server j: Q_j - V omega2 g_ij."""
    return state.backlog_J[None, :] - cfg.V * cfg.omega2 * np.asarray(scores_NJ, dtype=np.float64)


def slot_objective(
    spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec, scores_NJ: np.ndarray, decision: Decision
) -> float:
    """Drift-plus-penalty bound of ``decision`` (the quantity Stable-MoE minimises each slot)."""
    costs_NJ = routing_costs_NJ(state, cfg, scores_NJ)
    routing = np.take_along_axis(costs_NJ, decision.expert_ids_NK, axis=1)[decision.kept_mask()].sum()
    return float(routing + frequency_objective_J(spec, state, cfg, decision.freq_J).sum())


def solve_routing_milp(
    state: NetworkState, cfg: ControllerSpec, scores_NJ: np.ndarray, k: int, time_limit: float | None = None
) -> np.ndarray:
    """Routing by MILP: binary x_ij, sum_j x_ij = K, x_ij = 0 for offline j, minimise sum x_ij cost_ij."""
    costs_NJ = routing_costs_NJ(state, cfg, scores_NJ)
    N, J = costs_NJ.shape
    rows = np.repeat(np.arange(N), J)
    A = sparse.csr_array((np.ones(N * J), (rows, np.arange(N * J))), shape=(N, N * J))
    upper = np.tile(state.online_J.astype(np.float64), N)
    options = {"time_limit": time_limit} if time_limit else {}
    res = optimize.milp(
        costs_NJ.ravel(),
        constraints=optimize.LinearConstraint(A, k, k),
        integrality=np.ones(N * J),
        bounds=optimize.Bounds(0.0, upper),
        options=options,
    )
    if res.x is None:
        raise RuntimeError(f"reference MILP failed: {res.message}")
    x_NJ = np.rint(res.x).reshape(N, J).astype(bool)
    # Each row has exactly k ones; sorting by the column index keeps the k chosen ids per row.
    return np.sort(np.nonzero(x_NJ)[1].reshape(N, k), axis=1)


def solve_frequency_scalar(spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec) -> np.ndarray:
    """Frequency by bounded scalar minimisation per server on [lo, hi] (normalised to [0, 1])."""
    lo, hi = frequency_bounds(spec, state)
    freq_J = lo.copy()
    for j in np.nonzero(hi > lo)[0]:

        def objective(u: float, j: int = j) -> float:
            f = np.zeros(spec.num_servers)
            f[j] = lo[j] + u * (hi[j] - lo[j])
            return float(frequency_objective_J(spec, state, cfg, f)[j])

        res = optimize.minimize_scalar(
            objective, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}
        )
        # Brent's bounded search never evaluates the end points themselves; compare with them.
        candidates = [res.x, 0.0, 1.0]
        best = min(candidates, key=objective)
        freq_J[j] = lo[j] + best * (hi[j] - lo[j])
    return freq_J


def solve_reference(
    spec: NetworkSpec, state: NetworkState, cfg: ControllerSpec, scores_NJ: np.ndarray
) -> Decision:
    """The per-slot optimum found by generic solvers (MILP routing, scalar frequency search)."""
    ids_NK = solve_routing_milp(state, cfg, scores_NJ, spec.k)
    return Decision(ids_NK, solve_frequency_scalar(spec, state, cfg))
