"""Gate: restriction is the softmax over the subset; top-k routing; training; per-request routing."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgemoe.collab.embed import HashingEmbedder
from edgemoe.collab.gate import Gate, GateConfig, ensemble_nll, restricted_weights, route_weights, train_gate
from edgemoe.collab.policy import MoE2Policy, aggregate, route_request
from edgemoe.collab.profiles import CollabConfig, ExpertProfile

logits_st = arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(-20, 20))


@given(logits_st, st.data())
@settings(max_examples=60, deadline=None)
def test_restriction_equals_softmax_over_subset(logits, data):
    q, n = logits.shape
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    w = restricted_weights(logits, mask[None, :])
    if not mask.any():
        assert (w == 0).all()
        return
    ref = torch.softmax(torch.as_tensor(logits[:, mask]), dim=1).numpy()
    np.testing.assert_allclose(w[:, mask], ref, rtol=1e-9, atol=1e-12)
    assert (w[:, ~mask] == 0).all()


@given(logits_st, st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_top_k_keeps_the_k_largest_and_renormalises(logits, k):
    q, n = logits.shape
    w = route_weights(logits, np.ones((q, n), dtype=bool), k)
    kept = w > 0
    assert (kept.sum(axis=1) <= min(k, n)).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    for row in range(q):
        chosen = np.flatnonzero(kept[row])
        others = np.setdiff1d(np.arange(n), chosen)
        if len(others) and len(chosen):
            assert logits[row, chosen].min() >= logits[row, others].max() - 1e-12 or np.isclose(
                w[row, chosen].min(), 0
            )


def test_training_learns_category_specialists(tmp_path):
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 2, size=400)
    correct = np.where(cat[:, None] == np.arange(2)[None, :], 0.9, 0.2)  # expert c is right on category c
    emb = rng.normal(size=(400, 8)).astype(np.float32)
    gate = train_gate(emb, cat, correct, ["e0", "e1"], ["c0", "c1"], GateConfig(hidden=8, steps=150, lr=1e-2))
    logits = gate.logits(emb, cat)
    assert (logits.argmax(axis=1) == cat).mean() > 0.95
    before = ensemble_nll(torch.zeros(400, 2), torch.as_tensor(correct, dtype=torch.float32)).item()
    after = ensemble_nll(torch.as_tensor(logits), torch.as_tensor(correct)).item()
    assert after < before - 0.2
    gate.save(tmp_path / "g.pt")
    np.testing.assert_allclose(Gate.load(tmp_path / "g.pt").logits(emb, cat), logits)


def test_route_request_and_policy():
    names = ["a", "b", "c"]
    r = route_request(
        names,
        np.array([0.0, 1.0, 2.0]),
        np.array([True, True, False]),
        np.array([0.1, 0.2, 0.05]),
        np.array([1.0, 2.0, 3.0]),
        latency_budget_s=1.0,
        aggregation_s=0.01,
        k=None,
    )
    assert r.experts == ["b", "a"] and np.isclose(sum(r.weights), 1.0)
    assert np.isclose(r.delay_s, 0.21) and np.isclose(r.energy_j, 3.0)
    slow = route_request(names, np.zeros(3), np.ones(3, bool), np.full(3, 5.0), np.ones(3), 1.0, 0.0, 2)
    assert not slow.served and "latency budget" in slow.reason
    np.testing.assert_allclose(
        aggregate(np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), np.array([0.75, 0.25])), [0.75, 0.25, 0, 0]
    )
    cfg = CollabConfig(experts=[ExpertProfile(name=n) for n in names], top_k=2)
    emb = HashingEmbedder(dim=16)
    gate = Gate(16, names, cfg.categories, GateConfig(hidden=4))
    route = MoE2Policy(cfg, gate, emb, enabled=["a", "c"]).route("What is a cell?", "stem")
    assert set(route.experts) <= {"a", "c"} and 1 <= len(route.experts) <= 2
