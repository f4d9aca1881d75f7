"""Replay a request stream through the fine level, with or without the online energy queue.

The coarse level budgets energy on average over its selection questions; a stream with another
question mix can spend more. :func:`replay` serves recorded questions one by one in a given order,
exactly as the gateway would (:func:`edgemoe.collab.policy.route_request` on the gate's logits), and
reports the realised mean energy per request, its running maximum over the stream's second half,
and the accuracy (expected accuracy on correctness-only data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.collab.gate import Gate
from edgemoe.collab.offline.runs import RunData, problem
from edgemoe.collab.policy import EnergyQueue, route_request
from edgemoe.collab.profiles import Budgets
from edgemoe.collab.selection.dmo import dmo
from edgemoe.collab.selection.problem import SelectionProblem
from edgemoe.config import check_choice, require


@dataclass
class StreamResult:
    """What a replayed stream achieved; ``running_energy_j`` is the running mean after each request."""

    accuracy: float
    energy_j: float
    served_fraction: float
    experts_per_request: float
    running_energy_j: np.ndarray
    final_backlog_j: float

    def summary(self, budget_j: float | None = None) -> dict:
        out = {
            "accuracy": self.accuracy,
            "energy_j": self.energy_j,
            "served_fraction": self.served_fraction,
            "experts_per_request": self.experts_per_request,
            "final_backlog_j": self.final_backlog_j,
        }
        if budget_j is not None:
            out["energy_over_budget"] = self.energy_j / budget_j
            half = self.running_energy_j[len(self.running_energy_j) // 2 :]
            out["running_energy_max_second_half_over_budget"] = (
                float(half.max() / budget_j) if len(half) else 0.0
            )
        return out


def replay(
    problem: SelectionProblem,
    mask_N: np.ndarray,
    order: np.ndarray | None = None,
    queue: EnergyQueue | None = None,
) -> StreamResult:
    """Serve the questions of ``problem`` in ``order`` with the enabled set ``mask_N``.

    Each request is routed by the fine level (top-k of the enabled experts that fit its latency
    budget; energy-priced by ``queue`` when given, which then observes the request's energy).
    """
    q_order = np.arange(problem.num_questions) if order is None else np.asarray(order)
    mask_N = np.asarray(mask_N, dtype=bool)
    names = list(problem.names)
    correct, energy, served, experts = [], [], [], []
    for q in q_order:
        # Latency eligibility is precomputed: eligible experts "take" 0 s against a 1 s budget.
        route = route_request(
            names,
            problem.logits_QN[q],
            mask_N,
            np.where(problem.eligible_QN[q], 0.0, 2.0),
            problem.energy_QN[q],
            1.0,
            0.0,
            problem.top_k,
            queue=queue,
            weight_logits_N=problem.combine_QN[q],
        )
        if route.served:
            idx = [names.index(e) for e in route.experts]
            mix_O = np.asarray(route.weights) @ problem.probs_QNO[q, idx]
            p_y = float(mix_O[problem.answer_Q[q]])
            ok = p_y if problem.correctness_only else float(int(np.argmax(mix_O)) == problem.answer_Q[q])
        else:
            ok = 0.0  # unserved: wrong
        correct.append(ok)
        energy.append(route.energy_j)
        served.append(route.served)
        experts.append(len(route.experts))
        if queue is not None:
            queue.observe(route.energy_j)
    e = np.asarray(energy, dtype=np.float64)
    return StreamResult(
        accuracy=float(np.mean(correct)) if correct else 0.0,
        energy_j=float(e.mean()) if len(e) else 0.0,
        served_fraction=float(np.mean(served)) if served else 0.0,
        experts_per_request=float(np.mean(experts)) if experts else 0.0,
        running_energy_j=np.cumsum(e) / np.arange(1, len(e) + 1),
        final_backlog_j=queue.backlog_j if queue is not None else 0.0,
    )


def shift_experiment(
    select: SelectionProblem,
    serve: SelectionProblem,
    mask_N: np.ndarray,
    budget_j: float,
    v: float,
    order: np.ndarray | None = None,
    credit_j: float = 0.0,
) -> dict:
    """The enabled set chosen on ``select`` serves ``serve``'s stream without and with the queue.

    Reports, for both, accuracy and realised energy against the budget, plus the stream's floor
    (every request on its cheapest enabled expert: no policy of this set can spend less).
    """
    mask_N = np.asarray(mask_N, dtype=bool)
    free = replay(serve, mask_N, order)
    held = replay(serve, mask_N, order, queue=EnergyQueue(budget_j, v=v, credit_j=credit_j))
    energy_QN = np.where(serve.eligible_QN & mask_N[None, :], serve.energy_QN, np.inf)
    floor = energy_QN.min(axis=1)
    return {
        "budget_j": budget_j,
        "v": v,
        "credit_j": credit_j,
        "selection_energy_j": select.energy(mask_N),
        "stream_requests": int(serve.num_questions),
        "stream_energy_floor_j": float(floor[np.isfinite(floor)].mean())
        if np.isfinite(floor).any()
        else None,
        "without_queue": free.summary(budget_j),
        "with_queue": held.summary(budget_j),
        "accuracy_cost_of_queue": free.accuracy - held.accuracy,
        "running_energy_without_j": free.running_energy_j.tolist(),
        "running_energy_with_j": held.running_energy_j.tolist(),
    }


@dataclass
class ShiftSpec:
    """One shift experiment: the budget (J, or a fraction of all experts' reserved energy), the
    budget the enabled set is chosen under (default: the same), which categories it is chosen on
    (selection split) and which it serves (test split), stream order (``shuffled``, or ``blocks`` of
    the serve categories in the given order), queue weight V/B and credit (J), seed."""

    energy_j: float | None = None
    energy_fraction: float | None = None
    coarse_energy_fraction: float | None = None
    select_categories: list[str] | None = None
    serve_categories: list[str] | None = None
    order: str = "shuffled"
    v: float | None = None
    credit_j: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            (self.energy_j is None) != (self.energy_fraction is None),
            "--energy",
            "give one of --energy J or --energy-fraction F",
        )
        check_choice(self.order, "--order", ("shuffled", "blocks"))


def category_rows(ws: RunData, split: str, names: list[str] | None) -> np.ndarray:
    """Questions of ``split`` whose category is in ``names`` (all when None)."""
    idx = ws.index(split)
    if not names:
        return idx
    cats = list(ws.config.categories)
    for c in names:
        check_choice(c, "categories", cats)
    return idx[np.isin(ws.questions.category_Q[idx], [cats.index(c) for c in names])]


def run_shift(ws: RunData, gate: Gate, spec: ShiftSpec, latency: Budgets | None = None) -> dict:
    """Choose the set by DMO on the selection questions of ``select_categories``, serve the test
    questions of ``serve_categories`` without and with the energy queue (:func:`shift_experiment`)."""
    sel_rows = category_rows(ws, "select", spec.select_categories)
    serve_rows = category_rows(ws, "test", spec.serve_categories)
    require(len(sel_rows) > 0, "--select-categories", "selects no selection questions")
    require(len(serve_rows) > 0, "--serve-categories", "selects no test questions")
    select = problem(ws, gate, budgets=latency, index=sel_rows)
    serve = problem(ws, gate, budgets=latency, index=serve_rows)
    total = float(select.cost_N[select.usable_N].sum())
    budget = spec.energy_j if spec.energy_j is not None else float(spec.energy_fraction or 0.0) * total
    coarse = budget if spec.coarse_energy_fraction is None else spec.coarse_energy_fraction * total
    res = dmo(select, coarse)
    require(res.feasible, "--energy", res.reason)
    if spec.order == "shuffled":
        order = np.random.default_rng(spec.seed).permutation(len(serve_rows))
    else:  # blocks, in the order the categories were given
        cats = list(ws.config.categories)
        rank_C = np.arange(len(cats))
        if spec.serve_categories:
            rank_C = np.array(
                [spec.serve_categories.index(c) if c in spec.serve_categories else 0 for c in cats]
            )
        order = np.argsort(rank_C[ws.questions.category_Q[serve_rows]], kind="stable")
    v = spec.v if spec.v is not None else (ws.config.energy_queue_v or EnergyQueue.v)
    out = shift_experiment(select, serve, np.asarray(res.mask), budget, v, order, spec.credit_j)
    out.update(
        experts=res.experts,
        coarse_energy_budget_j=coarse,
        select_categories=spec.select_categories or "all",
        serve_categories=spec.serve_categories or "all",
    )
    return out
