"""Coarse-level expert selection: exact discrete monotonic optimisation (DMO) and exhaustive search.

DMO is a best-first branch and bound over the subset lattice. A node is a feasible set A plus the
candidates C that may still be added (later in a fixed expert order, and each still fitting the
energy budget on top of A: feasibility is down-closed, so nothing else can be reached). Every
child A∪{c} is evaluated incrementally from A's cached per-question mixture, then bounded from above
over all of its reachable supersets. Two bounds:

- ``valid`` (default, never assumes monotonicity). For accuracy, question q can be right in some
  superset only if, for every wrong option o,
  ``num_A(y) − num_A(o) + Σ_{n∈C} g_qn·max(p_qn(y) − p_qn(o), 0) ≥ 0`` (adding experts raises the
  correct option's margin by at most their positive parts) and, when no member of A serves q, some
  candidate ranks y at least as high as o. For the log-likelihood,
  ``p_S(y) ≤ min(1, (num_A(y) + Σ_{n∈C} g_qn p_qn(y)) / den_A, max(p_A(y), max_{n∈C} p_qn(y)))``.
  Each is a matrix product or a masked max for a whole batch of children. With a fine-level top-k,
  only experts ranked above the k-th member of A can be routed, and a mixture is at most its best
  member.
- ``monotone`` (the paper's superset bound): f(A ∪ C), exact only if adding experts never hurts.
  Whenever a prune relied on it (the valid bound would not have pruned), the node is deferred; after
  the search the deferred nodes are re-searched with the valid bound, sets that beat their superset
  bound are counted as monotonicity violations, and the answer is corrected if needed.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from edgemoe.collab.selection.problem import P_FLOOR, TIE_EPS, UNDERFLOW, SelectionProblem
from edgemoe.config import check_choice

BOUNDS = ("valid", "monotone")


def fits(cost: np.ndarray | float, budget: float) -> np.ndarray | bool:
    """Energy feasibility with a tolerance for float sums (the same test everywhere)."""
    return np.asarray(cost) <= budget + 1e-9 * max(1.0, abs(budget))


@dataclass
class SelectionResult:
    """A chosen enabled set and how it was found."""

    method: str
    experts: list[str]
    mask: list[bool]
    value: float
    accuracy: float
    log_likelihood: float
    energy_j: float
    feasible: bool
    reason: str = "ok"
    evals: int = 0
    bound_evals: int = 0
    nodes: int = 0
    seconds: float = 0.0
    relied_on_monotonicity: int = 0
    monotonicity_violations: int = 0
    fallback_changed_answer: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def no_feasible_reason(problem: SelectionProblem, budget: float) -> str | None:
    """Why no non-empty set is feasible, or None when one is (a single expert's energy is the same
    reserved or routed, and with routed energy a set is never cheaper than its cheapest member)."""
    if not problem.usable_N.any():
        return "no feasible set: no expert meets any request's latency budget"
    cheapest = float(problem.cost_N[problem.usable_N].min())
    if not fits(cheapest, budget):
        return (
            f"no feasible set: the cheapest usable expert reserves {cheapest:.4g} J per request, "
            f"above the energy budget of {budget:.4g} J"
        )
    return None


def result_for(
    problem: SelectionProblem,
    method: str,
    mask_N: np.ndarray | None,
    budget: float,
    reason: str | None = None,
    **kw,
) -> SelectionResult:
    """Package a chosen mask (re-evaluated with the batch evaluator) or an infeasible answer."""
    if mask_N is None or not np.any(mask_N):
        return SelectionResult(
            method=method,
            experts=[],
            mask=[False] * problem.num_experts,
            value=float("-inf"),
            accuracy=0.0,
            log_likelihood=float(np.log(1.0 / problem.num_options)),
            energy_j=0.0,
            feasible=False,
            reason=reason or no_feasible_reason(problem, budget) or "no feasible set",
            **kw,
        )
    mask_N = np.asarray(mask_N, dtype=bool)
    ev = problem.evaluate(mask_N[None])
    return SelectionResult(
        method=method,
        experts=[problem.names[i] for i in np.flatnonzero(mask_N)],
        mask=mask_N.tolist(),
        value=float(ev.value_B[0]),
        accuracy=float(ev.accuracy_B[0]),
        log_likelihood=float(ev.loglik_B[0]),
        energy_j=problem.energy(mask_N),
        feasible=True,
        **kw,
    )


def feasible_subsets(cost_N: np.ndarray, budget: float, allowed_N: np.ndarray) -> np.ndarray:
    """Every non-empty subset of the allowed experts within the budget, as int64 bitmasks."""
    masks = np.zeros(1, dtype=np.int64)
    costs = np.zeros(1)
    for n in np.flatnonzero(allowed_N):
        ok = fits(costs + cost_N[n], budget)
        masks = np.concatenate([masks, masks[ok] | np.int64(1 << int(n))])
        costs = np.concatenate([costs, costs[ok] + cost_N[n]])
    return masks[1:]


def unpack(bits_B: np.ndarray, n: int) -> np.ndarray:
    return ((bits_B[:, None] >> np.arange(n, dtype=np.int64)[None, :]) & 1).astype(bool)


def exhaustive(problem: SelectionProblem, budget: float, chunk: int = 512) -> SelectionResult:
    """Evaluate every feasible subset (vectorised, in chunks) and keep the best."""
    t0 = time.perf_counter()
    reason = no_feasible_reason(problem, budget)
    if reason:
        return result_for(problem, "exhaustive", None, budget, reason, seconds=time.perf_counter() - t0)
    if problem.additive:
        bits = feasible_subsets(problem.cost_N, budget, problem.usable_N)
    else:
        bits = feasible_subsets(problem.cost_N, np.inf, problem.usable_N)
    best_val, best_bits = -np.inf, 0
    for i in range(0, len(bits), chunk):
        part = bits[i : i + chunk]
        masks = unpack(part, problem.num_experts)
        val = problem.evaluate(masks, chunk=chunk).value_B
        if not problem.additive:
            val = np.where(fits(problem.energies(masks), budget), val, -np.inf)
        j = int(np.argmax(val))
        if val[j] > best_val:
            best_val, best_bits = float(val[j]), int(part[j])
    mask = (
        None if best_val == -np.inf else unpack(np.array([best_bits], dtype=np.int64), problem.num_experts)[0]
    )
    return result_for(problem, "exhaustive", mask, budget, evals=len(bits), seconds=time.perf_counter() - t0)


class _Bounder:
    """Upper bounds on the objective over all supersets reachable from a batch of nodes."""

    def __init__(self, problem: SelectionProblem):
        self.p = problem
        q, n, o = problem.probs_QNO.shape
        rows = np.arange(q)
        self.rows = rows
        py_QN = problem.correct_QN
        gain_NX = (
            (problem.gate_QN[:, :, None] * np.maximum(py_QN[:, :, None] - problem.probs_QNO, 0.0))
            .transpose(1, 0, 2)
            .reshape(n, q * o)
        )
        gpy_NQ = (problem.gate_QN * py_QN).T
        self.gain_NX = np.ascontiguousarray(gain_NX)
        self.gpy_NQ = np.ascontiguousarray(gpy_NQ)
        # Which eligible experts rank the correct option at least as high as option o.
        at_least_QNO = (py_QN[:, :, None] >= problem.probs_QNO) & problem.eligible_QN[:, :, None]
        self.ind_NX = (
            np.ascontiguousarray(at_least_QNO.transpose(1, 0, 2)).reshape(n, q * o).astype(np.float64)
        )
        self.py_elig_QN = np.where(problem.eligible_QN, py_QN, 0.0)
        order = problem.rank_order_QN
        self.py_sorted_QN = np.take_along_axis(py_QN, order, axis=1)
        self.margin_sorted_QNO = np.take_along_axis(
            py_QN[:, :, None] - problem.probs_QNO, order[:, :, None], 1
        )

    def bound(
        self,
        num_BQO: np.ndarray,
        den_BQ: np.ndarray,
        members_BN: np.ndarray,
        cand_BN: np.ndarray,
    ) -> np.ndarray:
        """Upper bound of the objective over every superset A ∪ T, T ⊆ C."""
        p = self.p
        if p.top_k is not None:
            return self._bound_top_k(num_BQO, den_BQ, members_BN, cand_BN)
        b, q, o = num_BQO.shape
        c = cand_BN.astype(np.float64)
        served_BQ = den_BQ > 0
        # A served mixture whose weights underflowed: bound it by 1 (optimistic, so still valid).
        lost_BQ = (den_BQ < UNDERFLOW) & p.served(members_BN)
        served_BQ &= ~lost_BQ
        num_y_BQ = num_BQO[:, self.rows, p.answer_Q]
        if p.objective == "accuracy" and not p.correctness_only:
            gain_BQO = (c @ self.gain_NX).reshape(b, q, o)
            # Without an enabled member, some candidate must rank y at least as high as each o.
            reach_BQO = served_BQ[:, :, None] | ((c @ self.ind_NX).reshape(b, q, o) > 0)
            ok_BQ = (((num_y_BQ[:, :, None] - num_BQO + gain_BQO) >= 0) & reach_BQO).all(axis=2) | lost_BQ
            acc_bound_B = ok_BQ.mean(axis=1)
        # p_S(y) is at most the ratio with every candidate's gain and no extra weight, and at most
        # the best of A's mixture and the candidates (a mixture never beats its best component).
        den_safe_BQ = np.where(served_BQ, den_BQ, 1.0)
        ratio_BQ = (num_y_BQ + c @ self.gpy_NQ) / den_safe_BQ
        best_cand_BQ = (cand_BN[:, None, :] * self.py_elig_QN[None]).max(axis=2)
        mix_BQ = np.maximum(num_y_BQ / den_safe_BQ, best_cand_BQ)
        p_bound_BQ = np.where(
            served_BQ, np.minimum(np.minimum(ratio_BQ, mix_BQ), 1.0), np.maximum(best_cand_BQ, 1.0 / o)
        )
        p_bound_BQ = np.where(lost_BQ, 1.0, p_bound_BQ)
        ll_bound_B = np.log(np.maximum(p_bound_BQ, P_FLOOR)).mean(axis=1)
        if p.objective == "accuracy" and p.correctness_only:
            # An unserved request scores 0 (wrong); served ones as for the likelihood bound.
            acc_p_BQ = np.where(served_BQ, p_bound_BQ, best_cand_BQ)
            acc_bound_B = np.where(lost_BQ, 1.0, acc_p_BQ).mean(axis=1)
        return acc_bound_B + TIE_EPS * ll_bound_B if p.objective == "accuracy" else ll_bound_B

    def _bound_top_k(
        self, num_BQO: np.ndarray, den_BQ: np.ndarray, members_BN: np.ndarray, cand_BN: np.ndarray
    ) -> np.ndarray:
        """Top-k fine level: a question no candidate can enter keeps A's exact score; otherwise only
        experts ranked above A's k-th member can be routed, and a mixture is at most its best member."""
        p = self.p
        order = p.rank_order_QN
        elig = p.eligible_sorted_QN[None]
        mem_BQN = members_BN[:, order] & elig
        above_BQN = np.cumsum(mem_BQN, axis=2) - mem_BQN
        entering_BQN = cand_BN[:, order] & elig & (above_BQN < p.top_k)
        fixed_BQ = ~entering_BQN.any(axis=2)
        allowed_BQN = (mem_BQN & (above_BQN < p.top_k)) | entering_BQN
        any_BQ = allowed_BQN.any(axis=2)
        unserved = np.log(1.0 / p.num_options)
        best_py_BQ = np.where(allowed_BQN, self.py_sorted_QN[None], 0.0).max(axis=2)
        ll_BQ = np.where(any_BQ, np.log(np.maximum(best_py_BQ, P_FLOOR)), unserved)
        ll_BQ = np.where(mem_BQN.any(axis=2), ll_BQ, np.maximum(ll_BQ, unserved))
        served_BQ = den_BQ > 0
        py_BQ = num_BQO[:, self.rows, p.answer_Q] / np.where(served_BQ, den_BQ, 1.0)
        exact_ll_BQ = np.where(served_BQ, np.log(np.maximum(py_BQ, P_FLOOR)), unserved)
        ll_BQ = np.where(fixed_BQ, exact_ll_BQ, ll_BQ)
        if p.objective != "accuracy":
            return ll_BQ.mean(axis=1)
        if p.correctness_only:
            unserved_p = 0.0  # an unserved request is wrong
            p_BQ = np.where(any_BQ, best_py_BQ, unserved_p)
            p_BQ = np.where(mem_BQN.any(axis=2), p_BQ, np.maximum(p_BQ, unserved_p))
            exact_p_BQ = np.where(served_BQ, py_BQ, unserved_p)
            p_BQ = np.where(fixed_BQ, exact_p_BQ, p_BQ)
            return p_BQ.mean(axis=1) + TIE_EPS * ll_BQ.mean(axis=1)
        best_margin_BQO = np.where(allowed_BQN[..., None], self.margin_sorted_QNO[None], -np.inf).max(axis=2)
        ok_BQ = (best_margin_BQO >= 0).all(axis=2) & any_BQ
        exact_ok_BQ = (num_BQO.argmax(axis=2) == p.answer_Q[None, :]) & served_BQ
        ok_BQ = np.where(fixed_BQ, exact_ok_BQ, ok_BQ)
        return ok_BQ.mean(axis=1) + TIE_EPS * ll_BQ.mean(axis=1)


@dataclass(order=True)
class _Node:
    priority: float
    depth: int
    tick: int
    mask: np.ndarray = field(compare=False)
    pos: int = field(compare=False)
    valid_bound: float = field(compare=False)
    mono_limit: float = field(compare=False, default=np.inf)


class _Search:
    """State of one DMO run: expert order, incumbent, counters, queue and deferred nodes."""

    def __init__(self, problem: SelectionProblem, budget: float, bound: str, order: np.ndarray):
        self.p = problem
        self.budget = budget
        self.bound_kind = bound
        self.bounder = _Bounder(problem)
        self.order = order
        self.rank_N = np.full(problem.num_experts, -1)
        self.rank_N[order] = np.arange(len(order))
        self.best_val = -np.inf
        self.best_mask: np.ndarray | None = None
        self.evals = self.bound_evals = self.nodes = 0
        self.relied = self.violations = 0
        self.heap: list[_Node] = []
        self.deferred: list[_Node] = []
        self.tick = itertools.count()

    def offer(self, values_B: np.ndarray, masks_BN: np.ndarray, mono_limit: float = np.inf) -> None:
        """Update the incumbent with freshly evaluated feasible sets (and count superset-bound violations)."""
        self.violations += int(np.sum(values_B > mono_limit + 1e-12))
        if not self.p.additive:
            values_B = np.where(fits(self.p.energies(masks_BN), self.budget), values_B, -np.inf)
        j = int(np.argmax(values_B))
        if values_B[j] > self.best_val:
            self.best_val, self.best_mask = float(values_B[j]), masks_BN[j].copy()

    def expand(self, node: _Node, fallback: bool) -> None:
        """Evaluate all children of a node incrementally from its cached mixture, then queue them."""
        p, cost = self.p, self.p.cost_N
        self.nodes += 1
        later = self.order[node.pos + 1 :]
        fit_later = fits(float(cost @ node.mask) + cost[later], self.budget) | (not p.additive)
        kids = later[fit_later]
        if len(kids) == 0:
            return
        masks_BN = np.repeat(node.mask[None], len(kids), axis=0)
        masks_BN[np.arange(len(kids)), kids] = True
        if p.top_k is None:
            num_QO, den_Q = p.mixtures(node.mask[None])
            num_BQO, den_BQ = num_QO + p.gp_NQO[kids], den_Q + p.gate_NQ[kids]
        else:
            num_BQO, den_BQ = p.mixtures(masks_BN)
        self.evals += len(kids)
        self.offer(p.score(num_BQO, den_BQ, masks_BN).value_B, masks_BN, node.mono_limit)
        self.queue(
            masks_BN, node.pos + 1 + np.flatnonzero(fit_later), num_BQO, den_BQ, node.mono_limit, fallback
        )

    def queue(
        self,
        masks_BN: np.ndarray,
        pos_B: np.ndarray,
        num_BQO: np.ndarray,
        den_BQ: np.ndarray,
        mono_limit: float,
        fallback: bool,
    ) -> None:
        """Bound evaluated sets over their reachable supersets and queue those that may beat the incumbent."""
        cost = self.p.cost_N
        set_cost_B = masks_BN @ cost
        later_BN = self.rank_N[None, :] > pos_B[:, None]
        cand_BN = later_BN & (fits(set_cost_B[:, None] + cost[None, :], self.budget) | (not self.p.additive))
        idx = np.flatnonzero(cand_BN.any(axis=1))
        if len(idx) == 0:
            return
        valid_B = self.bounder.bound(num_BQO[idx], den_BQ[idx], masks_BN[idx], cand_BN[idx])
        self.bound_evals += len(idx)
        bound_B = valid_B
        if self.bound_kind == "monotone" and not fallback:
            bound_B = np.minimum(valid_B, self.p.evaluate(masks_BN[idx] | cand_BN[idx]).value_B)
            self.evals += len(idx)
        for j, i in enumerate(idx):
            node = _Node(
                priority=-float(bound_B[j]),
                depth=-int(masks_BN[i].sum()),
                tick=next(self.tick),
                mask=masks_BN[i],
                pos=int(pos_B[i]),
                valid_bound=float(valid_B[j]),
                mono_limit=mono_limit,
            )
            if bound_B[j] > self.best_val:
                heapq.heappush(self.heap, node)
            else:
                self.defer(node)

    def defer(self, node: _Node) -> None:
        """A node pruned only by the superset bound is kept for the fallback search."""
        if node.valid_bound > self.best_val:
            self.relied += 1
            node.mono_limit = min(node.mono_limit, -node.priority)
            self.deferred.append(node)

    def run(self, fallback: bool) -> None:
        while self.heap:
            node = heapq.heappop(self.heap)
            if -node.priority > self.best_val:
                self.expand(node, fallback)
            elif not fallback:
                self.defer(node)


def dmo(problem: SelectionProblem, budget: float, bound: str = "valid") -> SelectionResult:
    """Exact coarse-level selection by best-first branch and bound (see module doc).

    Runs with single-threaded BLAS: its products are small (a node's children), where thread
    start-up costs more than it saves.
    """
    check_choice(bound, "bound", BOUNDS)
    with _single_thread_blas():
        return _dmo(problem, budget, bound)


def _single_thread_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, keep the defaults
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _dmo(problem: SelectionProblem, budget: float, bound: str) -> SelectionResult:
    t0 = time.perf_counter()
    reason = no_feasible_reason(problem, budget)
    if reason:
        return result_for(problem, f"dmo-{bound}", None, budget, reason, seconds=time.perf_counter() - t0)
    # With routed (non-additive) energy a set can cost less than a member alone: start from every expert.
    singles = np.flatnonzero(problem.usable_N & (fits(problem.cost_N, budget) | (not problem.additive)))
    # Expert order: most influential first (mean full-set gate weight), so the candidates left deep
    # in the tree carry little gate mass and the bounds there are tight.
    share_QN = problem.gate_QN / np.maximum(problem.gate_QN.sum(axis=1, keepdims=True), 1e-300)
    order = singles[np.argsort(-share_QN.mean(axis=0)[singles], kind="stable")]
    s = _Search(problem, budget, bound, order)
    # The root's children are the single experts.
    masks_BN = np.eye(problem.num_experts, dtype=bool)[order]
    num_BQO, den_BQ = problem.mixtures(masks_BN)
    s.evals += len(order)
    s.offer(problem.score(num_BQO, den_BQ, masks_BN).value_B, masks_BN)
    s.queue(masks_BN, np.arange(len(order)), num_BQO, den_BQ, np.inf, fallback=False)
    s.run(fallback=False)
    before = None if s.best_mask is None else s.best_mask.copy()
    changed = False
    if s.deferred:
        for node in s.deferred:
            node.priority = -node.valid_bound
            heapq.heappush(s.heap, node)
        s.deferred = []
        s.run(fallback=True)
        changed = before is not None and s.best_mask is not None and not np.array_equal(before, s.best_mask)
    return result_for(
        problem,
        f"dmo-{bound}",
        s.best_mask,
        budget,
        evals=s.evals,
        bound_evals=s.bound_evals,
        nodes=s.nodes,
        seconds=time.perf_counter() - t0,
        relied_on_monotonicity=s.relied,
        monotonicity_violations=s.violations,
        fallback_changed_answer=changed,
    )
