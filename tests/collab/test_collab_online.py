"""The online energy queue, stable restricted mixtures, and exact selection on correctness-only data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.collab.gate import restricted_weights
from edgemoe.collab.offline.stream import replay
from edgemoe.collab.policy import EnergyQueue, route_request
from edgemoe.collab.selection.baselines import equal_weight_reference
from edgemoe.collab.selection.dmo import dmo, exhaustive
from edgemoe.collab.selection.problem import SelectionProblem
from edgemoe.errors import ConfigError, InputError


def correctness_instance(seed, q=60, n=4, top_k=1, energy_mode="routed", gap=3.0, fit=1.0):
    rng = np.random.default_rng(seed)
    quality_QN = rng.random((q, n))
    return SelectionProblem(
        names=[f"e{i}" for i in range(n)],
        probs_QNO=np.stack([quality_QN, 1 - quality_QN], axis=2),
        answer_Q=np.zeros(q, dtype=np.int64),
        logits_QN=rng.normal(size=(q, n)) * gap,
        eligible_QN=rng.random((q, n)) < fit,
        energy_QN=rng.uniform(1, 10, (q, n)),
        delay_QN=np.zeros((q, n)),
        category_Q=np.zeros(q, dtype=np.int64),
        top_k=top_k,
        correctness_only=True,
        energy_mode=energy_mode,
    )


def test_correctness_only_accuracy_is_the_gate_weighted_mean():
    p = correctness_instance(0, top_k=None)
    mask = np.array([True, False, True, True])
    w_QN = restricted_weights(p.logits_QN, mask[None, :])
    expected = float((w_QN * p.correct_QN).sum(axis=1).mean())
    assert p.evaluate(mask[None]).accuracy_B[0] == pytest.approx(expected, abs=1e-12)


def test_equal_weight_reference_is_a_random_router_on_correctness_only_data():
    p = correctness_instance(3, top_k=1)
    mask = np.array([True, True, False, True])
    ref = equal_weight_reference(p, mask)
    assert ref["accuracy"] == pytest.approx(p.correct_QN[:, mask].mean(axis=1).mean())
    assert ref["energy_j"] == pytest.approx(p.energy_QN[:, mask].mean(axis=1).mean())


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    frac=st.floats(0.1, 1.0),
    top_k=st.sampled_from([None, 1, 2]),
    fit=st.sampled_from([1.0, 0.6]),
)
def test_dmo_equals_exhaustive_with_routed_energy(seed, frac, top_k, fit):
    """Also when some experts miss some requests' latency budget (an unserved request is wrong)."""
    p = correctness_instance(seed, top_k=top_k, fit=fit)
    budget = frac * float(p.cost_N.sum())
    d, e = dmo(p, budget), exhaustive(p, budget)
    assert d.feasible == e.feasible
    if e.feasible:
        assert d.value == pytest.approx(e.value, abs=1e-12)
        assert d.energy_j <= budget * (1 + 1e-9)


def test_restricted_mixture_is_exact_at_logit_gaps_over_1000():
    """Experts 1 and 2 sit 1000 and 1001 nats below expert 0: restricted to {1, 2} their weights are
    e/(1+e) and 1/(1+e), not an underflow to "unserved"."""
    probs = np.array([[[1.0, 0.0], [0.2, 0.8], [0.9, 0.1]]])
    p = SelectionProblem(
        names=["a", "b", "c"],
        probs_QNO=probs,
        answer_Q=np.array([1]),
        logits_QN=np.array([[0.0, -1000.0, -1001.0]]),
        eligible_QN=np.ones((1, 3), dtype=bool),
        energy_QN=np.ones((1, 3)),
        delay_QN=np.zeros((1, 3)),
        category_Q=np.zeros(1, dtype=np.int64),
        objective="log_likelihood",
    )
    w_b = np.e / (1 + np.e)
    p_y = w_b * 0.8 + (1 - w_b) * 0.1
    ev = p.evaluate(np.array([[False, True, True]]))
    assert ev.loglik_B[0] == pytest.approx(np.log(p_y), rel=1e-12)
    assert ev.accuracy_B[0] == 1.0  # 0.616 on option 1 beats 0.384
    np.testing.assert_allclose(
        restricted_weights(p.logits_QN, np.array([[False, True, True]])), [[0, w_b, 1 - w_b]]
    )
    # DMO's bounds stay valid there: it finds the exhaustive optimum.
    assert dmo(p, 10.0).value == pytest.approx(exhaustive(p, 10.0).value, abs=1e-12)


def test_energy_queue_holds_the_budget_on_a_shifting_stream():
    """Cheap requests first, then requests where the preferred expert costs 5x: the plain fine level
    overspends on the second half; with the queue the long-run mean stays within the budget."""
    rng = np.random.default_rng(1)
    q = 4000
    heavy_Q = np.arange(q) >= q // 2
    energy_QN = np.where(heavy_Q[:, None], [10.0, 2.0], [2.0, 1.0])
    quality_QN = np.clip(
        np.where(heavy_Q[:, None], [0.8, 0.5], [0.7, 0.6]) + rng.normal(0, 0.05, (q, 2)), 0, 1
    )
    p = SelectionProblem(
        names=["big", "small"],
        probs_QNO=np.stack([quality_QN, 1 - quality_QN], axis=2),
        answer_Q=np.zeros(q, dtype=np.int64),
        logits_QN=np.tile([1.0, 0.0], (q, 1)) + rng.normal(0, 0.3, (q, 2)),
        eligible_QN=np.ones((q, 2), dtype=bool),
        energy_QN=energy_QN,
        delay_QN=np.zeros((q, 2)),
        category_Q=np.zeros(q, dtype=np.int64),
        top_k=1,
        correctness_only=True,
    )
    budget = 3.0
    free = replay(p, np.ones(2, dtype=bool))
    held = replay(p, np.ones(2, dtype=bool), queue=EnergyQueue(budget, v=2.0))
    assert free.energy_j > 1.5 * budget
    assert held.energy_j <= budget * 1.01
    assert held.accuracy > 0.55  # still mostly served by the better expert where it is affordable
    assert held.final_backlog_j < 50 * budget  # the queue stays bounded


def test_route_request_prices_energy_only_with_a_backlog():
    names = ["big", "small"]
    args = (names, np.array([2.0, 0.0]), np.ones(2, bool), np.zeros(2), np.array([10.0, 1.0]), 1.0, 0.0, 1)
    queue = EnergyQueue(budget_j=2.0, v=1.0)
    assert route_request(*args, queue=queue).experts == ["big"]
    queue.observe(40.0)  # backlog 38 J: big costs 380 in price, small 38
    assert route_request(*args, queue=queue).experts == ["small"]
    with pytest.raises(InputError):
        queue.observe(float("nan"))
    with pytest.raises(ConfigError):
        EnergyQueue(budget_j=0.0)


def test_routellm_metrics_closed_form():
    from edgemoe.collab.offline.compare import routellm_metrics

    q = 100
    weak, strong = np.zeros(q), np.r_[np.ones(50), np.zeros(50)]
    perfect = routellm_metrics(strong - weak, weak, strong, points=1001)
    assert perfect["cpt50"] == 0.25 and perfect["cpt80"] == 0.4
    assert perfect["apgr"] == pytest.approx(0.75, abs=1e-3)
    blind = routellm_metrics(np.zeros(q), np.zeros(q), np.ones(q), points=1001)
    assert blind["cpt50"] == 0.5 and blind["apgr"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ConfigError):
        routellm_metrics(np.zeros(q), np.ones(q), np.zeros(q))


def test_queue_credit_spends_early_savings_and_still_holds_the_budget():
    """Cheap requests first: the plain queue ends far under budget, one with credit spends the savings
    on the dear requests (better accuracy) and stays within B + credit / T."""
    q = 2000
    heavy_Q = np.arange(q) >= q // 2
    energy_QN = np.where(heavy_Q[:, None], [8.0, 2.0], [1.0, 1.0])
    quality_QN = np.where(heavy_Q[:, None], [0.9, 0.4], [0.6, 0.6])
    p = SelectionProblem(
        names=["big", "small"],
        probs_QNO=np.stack([quality_QN, 1 - quality_QN], axis=2),
        answer_Q=np.zeros(q, dtype=np.int64),
        logits_QN=np.tile([1.0, 0.0], (q, 1)),
        eligible_QN=np.ones((q, 2), dtype=bool),
        energy_QN=energy_QN,
        delay_QN=np.zeros((q, 2)),
        category_Q=np.zeros(q, dtype=np.int64),
        top_k=1,
        correctness_only=True,
    )
    budget, credit = 3.0, 1000.0
    plain = replay(p, np.ones(2, dtype=bool), queue=EnergyQueue(budget, v=2.0))
    banked = replay(p, np.ones(2, dtype=bool), queue=EnergyQueue(budget, v=2.0, credit_j=credit))
    assert plain.energy_j <= budget * 1.01 and banked.energy_j <= budget + credit / q + 0.05
    assert banked.energy_j > plain.energy_j and banked.accuracy > plain.accuracy
