"""DMO is exact: equal to brute force on random (monotone and not) instances; infeasible budgets."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.collab.offline.assumptions import monotonicity
from edgemoe.collab.selection.baselines import BASELINES
from edgemoe.collab.selection.dmo import dmo, exhaustive
from edgemoe.collab.selection.problem import SelectionProblem


def instance(seed, n, q=24, monotone=False, top_k=None, objective="accuracy", elig=0.9):
    rng = np.random.default_rng(seed)
    answer = rng.integers(0, 4, q)
    if monotone:  # each expert either knows the answer (mass on it) or is uniform: accuracy = coverage
        knows = rng.random((q, n)) < rng.uniform(0.2, 0.7, size=n)
        probs = np.full((q, n, 4), 0.25)
        probs[knows] = 0.1
        probs[np.nonzero(knows)[0], np.nonzero(knows)[1], answer[np.nonzero(knows)[0]]] = 0.7
    else:
        z = rng.normal(size=(q, n, 4)) * 2
        probs = np.exp(z) / np.exp(z).sum(2, keepdims=True)
    return SelectionProblem(
        names=[f"e{i}" for i in range(n)],
        probs_QNO=probs,
        answer_Q=answer,
        logits_QN=rng.normal(size=(q, n)),
        eligible_QN=rng.random((q, n)) < elig,
        energy_QN=rng.uniform(1, 10, (q, n)),
        delay_QN=rng.uniform(0, 1, (q, n)),
        category_Q=rng.integers(0, 4, q),
        top_k=top_k,
        objective=objective,
    )


def brute_force(p, budget):
    best = -np.inf
    for bits in itertools.product([False, True], repeat=p.num_experts):
        m = np.array(bits)
        if m.any() and p.energy(m) <= budget + 1e-9 and (p.usable_N | ~m).all():
            best = max(best, float(p.evaluate(m[None]).value_B[0]))
    return best


@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 7),
    frac=st.floats(0.05, 1.0),
    monotone=st.booleans(),
    top_k=st.sampled_from([None, 1, 2]),
    objective=st.sampled_from(["accuracy", "log_likelihood"]),
    bound=st.sampled_from(["valid", "monotone"]),
)
@settings(max_examples=60, deadline=None)
def test_dmo_equals_brute_force(seed, n, frac, monotone, top_k, objective, bound):
    p = instance(seed, n, monotone=monotone, top_k=top_k, objective=objective)
    budget = frac * p.cost_N.sum()
    ref = brute_force(p, budget)
    got = dmo(p, budget, bound=bound)
    ex = exhaustive(p, budget)
    if ref == -np.inf:
        assert not got.feasible and not ex.feasible
        return
    assert got.feasible and got.value == pytest.approx(ref, abs=1e-12)
    assert ex.value == pytest.approx(ref, abs=1e-12)
    assert got.energy_j <= budget + 1e-9
    if monotone and objective == "accuracy" and top_k is None:
        assert got.accuracy == pytest.approx(ex.accuracy)


def test_monotone_bound_reports_reliance_and_falls_back():
    relied, fixed = 0, 0
    for seed in range(6):
        p = instance(seed, 8, q=60)
        budget = 0.4 * p.cost_N.sum()
        got, ex = dmo(p, budget, bound="monotone"), exhaustive(p, budget)
        assert got.value == pytest.approx(ex.value, abs=1e-12)
        relied += got.relied_on_monotonicity > 0
        fixed += got.fallback_changed_answer
        assert dmo(p, budget).relied_on_monotonicity == 0
    assert relied > 0
    assert monotonicity(instance(0, 8, q=60))["violation_rate"] > 0


def test_coverage_instances_are_monotone_in_accuracy():
    p = instance(3, 6, q=40, monotone=True, objective="accuracy")
    p.objective = "log_likelihood"  # dilution makes the likelihood non-monotone, so judge accuracy alone
    subsets = np.array(list(itertools.product([False, True], repeat=6)))
    acc = p.evaluate(subsets).accuracy_B
    for i, s in enumerate(subsets):
        for j in np.flatnonzero(~s):
            t = s.copy()
            t[j] = True
            assert acc[int("".join("1" if b else "0" for b in t), 2)] >= acc[i] - 1e-12


@pytest.mark.parametrize("method", ["dmo", "exhaustive", *BASELINES])
def test_infeasible_budgets_give_a_clear_answer(method):
    p = instance(1, 5)
    solve = {
        "dmo": dmo,
        "exhaustive": exhaustive,
        **{n: BASELINES.get(n, field="method") for n in BASELINES},
    }[method]
    res = solve(p, 0.5 * p.cost_N.min())
    assert not res.feasible and res.experts == [] and res.reason.startswith("no feasible set")
    slow = instance(1, 5, elig=0.0)
    res = solve(slow, 1e9)
    assert not res.feasible and "latency budget" in res.reason
