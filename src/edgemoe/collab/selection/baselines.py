"""Baselines for the coarse level, all under the same energy budget and latency eligibility.

- ``best_single``: the best feasible single expert.
- ``uniform``: as many experts as fit (cheapest first), combined with equal weights (no gate).
- ``greedy``: add the expert with the largest marginal objective gain per joule until none fits or helps.
- ``random``: a random maximal feasible set (experts in random order, each added if it fits), gated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from edgemoe.collab.selection.dmo import SelectionResult, fits, no_feasible_reason, result_for
from edgemoe.collab.selection.problem import SelectionProblem
from edgemoe.registry import Registry


def _candidates(problem: SelectionProblem, budget: float) -> np.ndarray:
    return np.flatnonzero(problem.usable_N & fits(problem.cost_N, budget))


def best_single(problem: SelectionProblem, budget: float) -> SelectionResult:
    t0 = time.perf_counter()
    cand = _candidates(problem, budget)
    if len(cand) == 0:
        return result_for(problem, "best_single", None, budget, no_feasible_reason(problem, budget))
    vals = problem.evaluate(np.eye(problem.num_experts, dtype=bool)[cand]).value_B
    mask = np.zeros(problem.num_experts, dtype=bool)
    mask[cand[int(np.argmax(vals))]] = True
    return result_for(problem, "best_single", mask, budget, evals=len(cand), seconds=time.perf_counter() - t0)


def uniform_gate(problem: SelectionProblem) -> SelectionProblem:
    """The same instance without a gate: no ranking, equal combine weights (all logits zero)."""
    zeros = np.zeros_like(problem.logits_QN)
    return dataclasses.replace(problem, logits_QN=zeros, weight_logits_QN=zeros)


def equal_weights(problem: SelectionProblem) -> SelectionProblem:
    """The same instance and routing, but equal combine weights over the routed experts."""
    return dataclasses.replace(problem, weight_logits_QN=np.zeros_like(problem.logits_QN))


def equal_weight_reference(problem: SelectionProblem, mask_N: np.ndarray) -> dict[str, float]:
    """The gate-free reference on the same enabled set: what MoE² would give without its gate.

    - every enabled expert serves (k = all): equal weights over all of them;
    - top-k on correctness-only data: k of the enabled experts that fit, drawn uniformly at random,
      equal weights; in expectation its accuracy is their mean probability of being right and its
      energy k times their mean energy;
    - top-k with option distributions: the gate's routing with equal combine weights.
    """
    mask_N = np.asarray(mask_N, dtype=bool)
    if problem.top_k is None:
        real = uniform_gate(problem).realised(mask_N)
        return {"accuracy": real["accuracy"], "energy_j": real["energy_realised_j"]}
    if problem.correctness_only:
        fit_QN = problem.eligible_QN & mask_N[None, :]
        count_Q = fit_QN.sum(axis=1)
        served_Q = count_Q > 0
        safe_Q = np.maximum(count_Q, 1)
        p_Q = np.where(fit_QN, problem.correct_QN, 0.0).sum(axis=1) / safe_Q
        p_Q = np.where(served_Q, p_Q, 0.0)  # unserved: wrong
        k_Q = np.minimum(count_Q, problem.top_k)
        e_Q = k_Q * np.where(fit_QN, problem.energy_QN, 0.0).sum(axis=1) / safe_Q
        return {"accuracy": float(p_Q.mean()), "energy_j": float(e_Q.mean())}
    real = equal_weights(problem).realised(mask_N)
    return {"accuracy": real["accuracy"], "energy_j": real["energy_realised_j"]}


def uniform(problem: SelectionProblem, budget: float) -> SelectionResult:
    t0 = time.perf_counter()
    cand = _candidates(problem, budget)
    if len(cand) == 0:
        return result_for(problem, "uniform", None, budget, no_feasible_reason(problem, budget))
    mask = np.zeros(problem.num_experts, dtype=bool)
    spent = 0.0
    for n in cand[np.argsort(problem.cost_N[cand], kind="stable")]:
        if fits(spent + problem.cost_N[n], budget):
            mask[n] = True
            spent += problem.cost_N[n]
    return result_for(
        uniform_gate(problem), "uniform", mask, budget, evals=1, seconds=time.perf_counter() - t0
    )


def greedy(problem: SelectionProblem, budget: float) -> SelectionResult:
    t0 = time.perf_counter()
    if no_feasible_reason(problem, budget):
        return result_for(problem, "greedy", None, budget)
    n = problem.num_experts
    mask = np.zeros(n, dtype=bool)
    current, evals = -np.inf, 0
    while True:
        spent = problem.energy(mask)
        cand = np.flatnonzero(problem.usable_N & ~mask & fits(spent + problem.cost_N, budget))
        if len(cand) == 0:
            break
        trial = np.repeat(mask[None], len(cand), axis=0)
        trial[np.arange(len(cand)), cand] = True
        vals = problem.evaluate(trial).value_B
        evals += len(cand)
        if not mask.any():
            gain = vals / np.maximum(problem.cost_N[cand], 1e-12)
        else:
            gain = (vals - current) / np.maximum(problem.cost_N[cand], 1e-12)
        j = int(np.argmax(gain))
        if mask.any() and vals[j] <= current:
            break
        mask[cand[j]] = True
        current = float(vals[j])
    return result_for(problem, "greedy", mask, budget, evals=evals, seconds=time.perf_counter() - t0)


def random_feasible(problem: SelectionProblem, budget: float, seed: int = 0) -> SelectionResult:
    t0 = time.perf_counter()
    cand = _candidates(problem, budget)
    if len(cand) == 0:
        return result_for(problem, "random", None, budget, no_feasible_reason(problem, budget))
    rng = np.random.default_rng(seed)
    mask = np.zeros(problem.num_experts, dtype=bool)
    spent = 0.0
    for n in rng.permutation(cand):
        if fits(spent + problem.cost_N[n], budget):
            mask[n] = True
            spent += problem.cost_N[n]
    return result_for(problem, "random", mask, budget, evals=1, seconds=time.perf_counter() - t0)


BASELINES: Registry[Callable[..., SelectionResult]] = Registry("baseline")
for _name, _fn in (
    ("best_single", best_single),
    ("uniform", uniform),
    ("greedy", greedy),
    ("random", random_feasible),
):
    BASELINES.add(_name, _fn)
