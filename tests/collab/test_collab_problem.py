"""The vectorised objective against a per-question reference; baselines never beat exact DMO."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.collab.gate import route_weights
from edgemoe.collab.offline.assumptions import monotonicity
from edgemoe.collab.selection.baselines import best_single, greedy, random_feasible
from edgemoe.collab.selection.dmo import dmo
from edgemoe.collab.selection.problem import TIE_EPS, SelectionProblem


def instance(seed, n=5, q=20, top_k=None, objective="accuracy"):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(q, n, 4)) * 2
    return SelectionProblem(
        names=[f"e{i}" for i in range(n)],
        probs_QNO=np.exp(z) / np.exp(z).sum(2, keepdims=True),
        answer_Q=rng.integers(0, 4, q),
        logits_QN=rng.normal(size=(q, n)) * 3,
        eligible_QN=rng.random((q, n)) < 0.8,
        energy_QN=rng.uniform(1, 10, (q, n)),
        delay_QN=rng.uniform(0, 1, (q, n)),
        category_Q=rng.integers(0, 4, q),
        top_k=top_k,
        objective=objective,
    )


def reference(p: SelectionProblem, mask: np.ndarray) -> tuple[float, float]:
    """Accuracy and log-likelihood by routing each question on its own."""
    acc, ll = [], []
    for q in range(p.num_questions):
        enabled = mask & p.eligible_QN[q]
        if not enabled.any():
            acc.append(0.0)
            ll.append(np.log(0.25))
            continue
        w = route_weights(p.logits_QN[q][None], enabled[None], p.top_k)[0]
        mix = w @ p.probs_QNO[q]
        acc.append(float(np.argmax(mix) == p.answer_Q[q]))
        ll.append(float(np.log(mix[p.answer_Q[q]])))
    return float(np.mean(acc)), float(np.mean(ll))


@given(seed=st.integers(0, 1000), top_k=st.sampled_from([None, 1, 2, 3]))
@settings(max_examples=25, deadline=None)
def test_vectorised_objective_matches_per_question_routing(seed, top_k):
    p = instance(seed, top_k=top_k)
    masks = np.array(list(itertools.product([False, True], repeat=p.num_experts)))
    ev = p.evaluate(masks)
    for i in range(0, len(masks), 7):
        acc, ll = reference(p, masks[i])
        assert ev.accuracy_B[i] == pytest.approx(acc)
        assert ev.loglik_B[i] == pytest.approx(ll)
        assert ev.value_B[i] == pytest.approx(acc + TIE_EPS * ll)


@given(seed=st.integers(0, 1000), frac=st.floats(0.1, 0.8), top_k=st.sampled_from([None, 2]))
@settings(max_examples=25, deadline=None)
def test_gated_baselines_never_beat_dmo(seed, frac, top_k):
    p = instance(seed, n=6, top_k=top_k)
    budget = frac * p.cost_N.sum()
    best = dmo(p, budget)
    for res in (best_single(p, budget), greedy(p, budget), random_feasible(p, budget, seed=seed)):
        assert res.energy_j <= budget + 1e-9
        assert res.value <= best.value + 1e-12


def test_realised_costs_stay_within_the_reservation():
    p = instance(3, n=6)
    mask = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    real = p.realised(mask)
    assert real["energy_realised_j"] == pytest.approx(real["energy_reserved_j"])
    top1 = dataclasses.replace(p, top_k=1).realised(mask)
    assert top1["energy_realised_j"] < real["energy_reserved_j"]
    assert top1["experts_per_request"] <= 1


def test_monotonicity_counts_match_brute_force():
    p = instance(5, n=4)
    vals = {}
    for bits in itertools.product([False, True], repeat=4):
        vals[bits] = p.evaluate(np.array(bits)[None]).value_B[0]
    drops = []
    for bits, v in vals.items():
        if not any(bits):
            continue
        for j in range(4):
            if not bits[j]:
                plus = tuple(b or (i == j) for i, b in enumerate(bits))
                drops.append(v - vals[plus])
    got = monotonicity(p)
    assert got["pairs"] == len(drops)
    assert got["violation_rate"] == pytest.approx(np.mean(np.array(drops) > 1e-12))
    assert got["max_drop"] == pytest.approx(max(drops))


def test_sampled_monotonicity_for_many_experts():
    got = monotonicity(instance(6, n=6), max_exhaustive=3, samples=400)
    assert not got["exhaustive"] and 0 < got["pairs"] <= 400
    assert 0.0 <= got["violation_rate"] <= 1.0
