"""Controllers: closed form vs the generic solver, hypothesis properties, limits, offline servers."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.config import ConfigError
from edgemoe.edge import NetworkState, advance, load_scenario, make_controller, spec_from_dict
from edgemoe.edge.controllers import CONTROLLER_NAMES, StableMoE, lyapunov_frequency, route_sequential
from edgemoe.edge.reference import slot_objective, solve_reference
from edgemoe.edge.spec import SCENARIOS, ControllerSpec


def random_spec(rng, J, k):
    servers = [
        {
            "f_max": float(rng.uniform(0.5, 3.0)) * 1e9,
            "f_min": float(rng.choice([0.0, rng.uniform(0.0, 0.4)])) * 1e9,
            "cycles_per_token": float(rng.uniform(0.5, 2.0)) * 1e7,
            "kappa": float(rng.uniform(0.5, 2.0)) * 1e-28,
            "energy_budget": float(rng.uniform(0.1, 1.0)),
        }
        for _ in range(J)
    ]
    return spec_from_dict({"name": "rand", "servers": servers, "k": k})


def random_state(rng, spec, k):
    J = spec.num_servers
    state = NetworkState.initial(spec)
    state.backlog_E = rng.uniform(0, 400, J) * (rng.random(J) < 0.85)
    state.energy_queue_E = rng.uniform(0, 20, J) * (rng.random(J) < 0.7)
    online = rng.random(J) < 0.85
    online[rng.choice(J, k, replace=False)] = True
    state.online_E = online
    return state


def test_closed_form_matches_reference_solver_on_random_instances():
    rng = np.random.default_rng(2024)
    interior = 0
    for _ in range(220):
        J = int(rng.integers(2, 9))
        k = int(rng.integers(1, J + 1))
        spec = random_spec(rng, J, k)
        state = random_state(rng, spec, k)
        cfg = ControllerSpec(
            V=float(rng.choice([0.0, rng.uniform(0, 1000)])),
            omega1=float(rng.uniform(0, 3)),
            omega2=float(rng.uniform(0, 3)),
            energy_weight=float(rng.uniform(0.5, 50)),
            mode="linear",
        )
        scores = rng.dirichlet(np.ones(J), size=int(rng.integers(1, 16)))
        mine = StableMoE(spec, cfg).decide(state, scores)
        ref = solve_reference(spec, state, cfg, scores)
        a = slot_objective(spec, state, cfg, scores, mine)
        b = slot_objective(spec, state, cfg, scores, ref)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
        np.testing.assert_allclose(mine.freq_E, ref.freq_E, rtol=1e-6, atol=1e-6 * spec.f_max_E.max())
        lo_hi = (mine.freq_E > 0) & (mine.freq_E < np.minimum(spec.f_max_E, spec.cycles_E * state.backlog_E))
        interior += int((lo_hi & (state.energy_queue_E > 0)).sum())
        # Routing: same cost per token (ids can differ only between equal-cost servers).
        cost = state.backlog_E - cfg.V * cfg.omega2 * scores
        mine_cost = np.sort(np.take_along_axis(cost, mine.expert_ids_NK, axis=1), axis=1)
        ref_cost = np.sort(np.take_along_axis(cost, ref.expert_ids_NK, axis=1), axis=1)
        np.testing.assert_allclose(mine_cost, ref_cost, rtol=1e-9, atol=1e-9)
    assert interior > 50  # the sqrt branch (not just the bounds) was exercised


def check_decision(decision, state, k):
    ids = decision.expert_ids_NK
    assert ids.shape[1] == k
    srt = np.sort(ids, axis=1)
    assert (np.diff(srt, axis=1) > 0).all(), "experts of a token must be distinct"
    assert state.online_E[ids].all(), "routed to an offline server"
    assert (decision.freq_E[~state.online_E] == 0).all()
    assert (decision.freq_E >= 0).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(0, 70),
    name=st.sampled_from(CONTROLLER_NAMES),
    block=st.integers(0, 9),
)
def test_every_token_gets_k_distinct_online_experts(seed, n, name, block):
    rng = np.random.default_rng(seed)
    J = int(rng.integers(2, 10))
    k = int(rng.integers(1, J + 1))
    spec = random_spec(rng, J, k)
    state = random_state(rng, spec, k)
    ctrl = make_controller(name, spec, V=float(rng.uniform(0, 500)), block=block, seed=seed)
    scores = rng.dirichlet(np.ones(J), size=n)
    decision = ctrl.decide(state, scores)
    assert decision.expert_ids_NK.shape == (n, k)
    check_decision(decision, state, k)
    if decision.kept_NK is not None:
        cap = np.ceil(spec.controller.capacity_factor * n * k / state.online_E.sum())
        assert (decision.routed_E(J) <= cap).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(1, 40))
def test_queues_never_negative(seed, slots):
    rng = np.random.default_rng(seed)
    spec = load_scenario("paper")
    state = NetworkState.initial(spec)
    for _ in range(slots):
        freq = rng.uniform(0, 1, 8) * spec.f_max_E
        served = rng.uniform(0, 300, 8) if rng.random() < 0.5 else None  # over-reported service too
        advance(state, spec, freq, rng.integers(0, 200, 8), served_E=served)
        assert (state.backlog_E >= 0).all() and (state.energy_queue_E >= 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["linear", "sequential"]))
def test_large_V_is_topk_and_zero_V_is_jsq(seed, mode):
    rng = np.random.default_rng(seed)
    spec = load_scenario("paper")
    state = random_state(rng, spec, spec.k)
    state.backlog_E = rng.permutation(np.arange(8.0) * 37.0) + rng.uniform(0, 1, 8)  # no ties, even +1s
    scores = rng.dirichlet(np.ones(8), size=int(rng.integers(1, 50)))
    online = state.online_E
    srt = np.sort(np.where(online, scores, -1), axis=1)
    gap = np.min(np.diff(srt[:, -(spec.k + 1) :], axis=1))
    V = 1e3 * (state.backlog_E.max() + 1000) / max(gap, 1e-12)
    big = make_controller("stable-moe", spec, V=V, mode=mode).decide(state, scores)
    topk = make_controller("topk", spec).decide(state, scores)
    np.testing.assert_array_equal(np.sort(big.expert_ids_NK, 1), np.sort(topk.expert_ids_NK, 1))
    zero = make_controller("stable-moe", spec, V=0.0, mode=mode, block=1).decide(state, scores)
    jsq = make_controller("jsq-k", spec, mode=mode).decide(state, scores)
    if mode == "linear":
        np.testing.assert_array_equal(np.sort(zero.expert_ids_NK, 1), np.sort(jsq.expert_ids_NK, 1))
    else:  # identical tokens: which token goes where is immaterial, the per-server counts are the rule
        np.testing.assert_array_equal(zero.routed_E(8), jsq.routed_E(8))
    np.testing.assert_allclose(zero.freq_E, jsq.freq_E)


def sequential_by_loop(utility_NE, backlog_E, k):
    provisional = backlog_E.astype(float).copy()
    out = []
    for row in utility_NE:
        choice = np.argsort(-(row - provisional), kind="stable")[:k]
        out.append(np.sort(choice))
        provisional[choice] += 1
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_sequential_block_one_is_token_by_token(seed):
    rng = np.random.default_rng(seed)
    J, k, n = int(rng.integers(2, 9)), 0, int(rng.integers(1, 60))
    k = int(rng.integers(1, J + 1))
    utility = rng.uniform(0, 30, (n, J))
    backlog = rng.uniform(0, 20, J)
    mine = np.sort(route_sequential(utility, backlog, k, block=1), axis=1)
    np.testing.assert_array_equal(mine, sequential_by_loop(utility, backlog, k))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_jsq_water_filling_equals_token_by_token(seed):
    rng = np.random.default_rng(seed)
    J = int(rng.integers(2, 10))
    k = int(rng.integers(1, J + 1))
    spec = random_spec(rng, J, k)
    state = random_state(rng, spec, k)
    state.backlog_E = rng.uniform(0, float(rng.choice([1, 10, 100])), J)  # ties have probability 0
    n = int(rng.integers(0, 80))
    decision = make_controller("jsq-k", spec, mode="sequential").decide(state, np.full((n, J), 1 / J))
    check_decision(decision, state, k)
    online = np.flatnonzero(state.online_E)
    loop = sequential_by_loop(np.zeros((n, len(online))), state.backlog_E[online], k).astype(np.int64)
    expected = np.bincount(online[loop.ravel()], minlength=J).astype(np.float64)
    np.testing.assert_array_equal(decision.routed_E(J), expected)


def test_sequential_spreads_a_slot_across_queues():
    spec = load_scenario("paper")
    state = NetworkState.initial(spec)
    scores = np.full((400, 8), 1 / 8)
    lin = make_controller("stable-moe-linear", spec).decide(state, scores).routed_E(8)
    seq = make_controller("stable-moe-sequential", spec, block=1).decide(state, scores).routed_E(8)
    assert lin.max() == 400  # everyone joins the same two empty queues
    np.testing.assert_array_equal(seq, np.full(8, 100.0))  # water-filling


def test_offline_servers_get_nothing_and_too_few_online_is_an_error():
    spec = load_scenario("paper")
    state = NetworkState.initial(spec)
    state.backlog_E[:] = 50.0
    scores = np.random.default_rng(0).dirichlet(np.ones(8), size=300)
    for j in (0, 1, 5):
        state.set_online(j, False)
    for name in CONTROLLER_NAMES:
        decision = make_controller(name, spec).decide(state, scores)
        check_decision(decision, state, spec.k)
        assert decision.routed_E(8)[[0, 1, 5]].sum() == 0
        outcome = advance(state.copy(), spec, decision.freq_E, decision.routed_E(8))
        assert (outcome.served_E[[0, 1, 5]] == 0).all()
    for j in range(2, 8):
        state.set_online(j, j == 2)
    with pytest.raises(ConfigError, match="^state.online_E"):
        make_controller("stable-moe", spec).decide(state, scores)


def test_controller_and_state_resume_exactly():
    spec = load_scenario("paper")
    scores = np.random.default_rng(0).dirichlet(np.ones(8), size=(6, 50))
    ctrl = make_controller("random-k", spec, seed=5)
    state = NetworkState.initial(spec)
    for s in scores[:3]:
        d = ctrl.decide(state, s)
        advance(state, spec, d.freq_E, d.routed_E(8))
    ckpt = {"ctrl": ctrl.state_dict(), "state": state.state_dict()}
    rest = [ctrl.decide(state, s).expert_ids_NK for s in scores[3:]]
    ctrl2, state2 = make_controller("random-k", spec, seed=123), NetworkState.initial(spec)
    ctrl2.load_state_dict(ckpt["ctrl"])
    state2.load_state_dict(ckpt["state"])
    np.testing.assert_array_equal(state2.backlog_E, state.backlog_E)
    for s, ids in zip(scores[3:], rest):
        np.testing.assert_array_equal(ctrl2.decide(state2, s).expert_ids_NK, ids)


def test_frequency_rules():
    spec = load_scenario("paper")
    state = NetworkState.initial(spec)
    state.backlog_E[:] = 1e6  # backlog never limits
    fixed = make_controller("stable-moe-fixed-freq", spec).decide(state, np.full((1, 8), 0.125))
    np.testing.assert_allclose(fixed.freq_E, spec.f_sustainable_E)
    np.testing.assert_allclose(
        make_controller("topk-max", spec).decide(state, np.full((1, 8), 0.125)).freq_E, spec.f_max_E
    )
    # Lyapunov frequency equals the sustainable one when Z / E^max = (Q + V omega1) / w.
    cfg = spec.controller
    state.backlog_E[:] = 30.0
    state.energy_queue_E = spec.budget_E * (30.0 + cfg.V * cfg.omega1) / cfg.energy_weight
    f = lyapunov_frequency(spec, state, cfg.V, cfg.omega1, cfg.energy_weight)
    cap = np.minimum(spec.f_sustainable_E, spec.cycles_E * 30.0 / spec.tau)
    np.testing.assert_allclose(f, cap, rtol=1e-12)
    # Never faster than the backlog needs: an empty queue runs at 0.
    state.backlog_E[:] = 0.0
    assert (make_controller("topk-max", spec).decide(state, np.full((1, 8), 0.125)).freq_E == 0).all()


def test_make_controller_names():
    spec = load_scenario("paper")
    assert make_controller("stable-moe-linear", spec).cfg.mode == "linear"
    assert make_controller("jsq-k", spec).cfg.V == 0.0
    with pytest.raises(ConfigError, match="^policy"):
        make_controller("nope", spec)
    assert dataclasses.replace(spec.controller) == spec.controller
    assert set(SCENARIOS) >= {"paper", "homogeneous", "bursty", "large"}


@pytest.mark.parametrize("target", ["uniform", "capacity"])
def test_bias_balancers_reach_their_target_share(target):
    """With a gate that always prefers the same servers, the auxiliary-loss-free bias moves the load
    to the target share: equal, or proportional to f_max / C."""
    spec = load_scenario("paper")
    ctrl = make_controller(f"bias-{target}", spec)
    rng = np.random.default_rng(0)
    state = NetworkState.initial(spec)
    weight = np.ones(8) if target == "uniform" else spec.f_max_E / spec.cycles_E
    share = weight / weight.sum()
    loads = []
    for t in range(600):
        scores = rng.dirichlet(np.exp(-np.arange(8) / 2.0) * 5, size=200)
        d = ctrl.decide(state, scores)
        if t >= 400:
            loads.append(d.routed_E(8))
    got = np.mean(loads, axis=0) / (200 * spec.k)
    np.testing.assert_allclose(got, share, atol=0.02)
    # the bias is state that resumes
    other = make_controller(f"bias-{target}", spec)
    other.load_state_dict(ctrl.state_dict())
    assert np.array_equal(other.decide(state, scores).expert_ids_NK, ctrl.decide(state, scores).expert_ids_NK)


def test_jsq_pairs_servers_at_random():
    """Dealt in index order, JSQ-K would pair server j with j + J/K almost always."""
    spec = load_scenario("paper")
    ctrl = make_controller("jsq-k", spec, seed=3)
    state = NetworkState.initial(spec)
    pairs = set()
    for _ in range(20):
        ids = ctrl.decide(state, np.full((64, 8), 1 / 8)).expert_ids_NK
        assert (ids[:, 0] != ids[:, 1]).all()
        assert (np.bincount(ids.ravel(), minlength=8) == 16).all()  # still water-filling
        pairs |= {tuple(sorted(p)) for p in ids.tolist()}
    assert len(pairs) > 20  # of the 28 possible pairs
