"""ETR router: closed forms, reference equivalences and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.config import ConfigError, from_dict
from edgemoe.moe import EXECUTORS, MoEConfig, RouterConfig
from edgemoe.moe.etr import (
    AnnealedCapacity,
    CapacityConfig,
    CapacityObservation,
    ETRRouter,
    ETRRouterConfig,
    FalsePositiveCapacity,
    FixedCapacity,
    false_positive_counts,
    grap_affinity,
    locality_loss,
    locality_target,
    slots_to_mask,
    token_choice,
)
from edgemoe.moe.routing import expert_capacity, expert_choice


def make_router(dim: int = 16, experts: int = 4, top_k: int = 1, **fields) -> ETRRouter:
    """An ETR router from a mapping, as a YAML config gives it."""
    cfg = RouterConfig.from_mapping({"name": "etr", "top_k": top_k, "renormalize": False, **fields})
    return cfg.build(dim, experts)


def obs(rearranged: float = 0.1, fp: float = 0.0, tpe: float = 10.0) -> CapacityObservation:
    return CapacityObservation(
        rearranged_fraction=rearranged, false_positives_per_expert=fp, tokens_per_expert=tpe
    )


# ------------------------------------------------------------------------------------------ affinity


def test_affinity_closed_form_on_hand_made_vectors():
    x = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],  # all mass in group 0: cos with (1,1,0,0)/sqrt2 is 1
            [3.0, 0.0, 0.0, 4.0],  # |x|=5: group0 3/(sqrt2*5), group1 4/(sqrt2*5)
            [1.0, -1.0, 2.0, 2.0],  # |x|=sqrt10: group0 0, group1 4/(sqrt2*sqrt10)
            [0.0, 0.0, 0.0, 0.0],  # zero token: affinity 0
        ]
    )
    expected = torch.tensor(
        [
            [1.0, 0.0],
            [3 / (math.sqrt(2) * 5), 4 / (math.sqrt(2) * 5)],
            [0.0, 4 / (math.sqrt(2) * math.sqrt(10))],
            [0.0, 0.0],
        ]
    )
    torch.testing.assert_close(grap_affinity(x, 2), expected)


def test_affinity_is_cosine_with_group_indicators():
    torch.manual_seed(0)
    x = torch.randn(32, 12)
    w = torch.zeros(3, 12)
    for i in range(3):
        w[i, 4 * i : 4 * (i + 1)] = 1.0
    torch.testing.assert_close(
        grap_affinity(x, 3), torch.nn.functional.cosine_similarity(x[:, None], w[None], dim=-1)
    )


def test_indivisible_dim_is_a_clear_error():
    with pytest.raises(ConfigError, match="not divisible by num_experts=3"):
        make_router(dim=16, experts=3)


def test_router_has_no_learnable_weights_but_gradient_reaches_the_tokens():
    router = make_router(capacity={"factor": 2.0})
    assert list(router.parameters()) == []
    x = torch.randn(20, 16, requires_grad=True)
    routing = router(x)
    (routing.weights_TK.sum() + routing.aux_losses["locality"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gate_is_softmax_of_affinity_over_temperature():
    router = make_router(temperature=0.25)
    x = torch.randn(10, 16)
    routing = router(x)
    torch.testing.assert_close(routing.scores_TE, torch.softmax(grap_affinity(x, 4) / 0.25, dim=-1))


# ------------------------------------------------------------------------------------- token choice


def test_l1_with_unlimited_capacity_routes_like_argmax_affinity():
    torch.manual_seed(1)
    x = torch.randn(200, 16)
    router = make_router(capacity={"factor": 100.0, "floor": 1.0})
    routing = router(x)
    assert routing.kept_TK.all()
    assert torch.equal(routing.expert_ids_TK[:, 0], grap_affinity(x, 4).argmax(-1))
    router.eval()
    assert torch.equal(router(x).expert_ids_TK[:, 0], grap_affinity(x, 4).argmax(-1))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    l_max=st.integers(1, 5),
    threshold=st.floats(0.0, 1.0),
)
def test_token_choice_takes_fewest_experts_reaching_the_threshold(seed, l_max, threshold):
    gen = torch.Generator().manual_seed(seed)
    gate_TE = torch.softmax(torch.randn(16, 5, generator=gen) * 2, dim=-1)
    ids_TK, proposed_TK = token_choice(gate_TE, l_max, threshold)
    count_T = proposed_TK.sum(-1)
    sorted_TE = gate_TE.sort(-1, descending=True).values
    mass_T = (sorted_TE * (torch.arange(5) < count_T[:, None])).sum(-1)
    assert ((count_T >= 1) & (count_T <= l_max)).all()
    reached = mass_T >= threshold - 1e-6
    assert (reached | (count_T == l_max)).all()
    # minimal: without the last proposal the threshold was not yet reached
    before_T = mass_T - sorted_TE.gather(-1, (count_T - 1)[:, None]).squeeze(-1)
    assert ((before_T < threshold) | (count_T == 1)).all()
    assert torch.equal(ids_TK[:, 0], gate_TE.argmax(-1))


def test_inference_keeps_every_proposal_without_capacity():
    router = make_router(top_k=2, score_threshold=0.9, capacity={"factor": 0.2, "floor": 0.1})
    x = torch.randn(64, 16)
    router.eval()
    routing = router(x)
    assert routing.capacity is None
    assert torch.equal(routing.kept_TK, routing.proposed_TK)
    assert routing.extras["capacity_factor"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ expert choice


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tokens=st.integers(1, 40),
    capacity=st.integers(0, 45),
    density=st.floats(0.1, 1.0),
)
def test_expert_keeps_exactly_its_top_c_candidates_by_affinity(seed, tokens, capacity, density):
    gen = torch.Generator().manual_seed(seed)
    aff_TE = torch.randn(tokens, 4, generator=gen)
    cand_TE = torch.rand(tokens, 4, generator=gen) < density
    kept_TE = expert_choice(aff_TE, capacity, cand_TE)
    assert not (kept_TE & ~cand_TE).any()
    for e in range(4):
        cand = cand_TE[:, e].nonzero().squeeze(-1)
        expected = cand[aff_TE[cand, e].argsort(descending=True)[:capacity]]
        assert kept_TE[:, e].sum() == min(capacity, len(cand))
        assert set(kept_TE[:, e].nonzero().squeeze(-1).tolist()) == set(expected.tolist())


def test_router_caps_every_expert_and_never_reassigns():
    torch.manual_seed(2)
    router = make_router(dim=32, experts=4, top_k=2, score_threshold=0.8, capacity={"factor": 0.5})
    x = torch.randn(128, 32)
    routing = router(x)
    cap = expert_capacity(0.5, 128, 4, 2)
    assert routing.capacity == cap
    assert (routing.stats.tokens_per_expert_E <= cap).all()
    # kept slots are a subset of proposals: a dropped token is not moved to another expert
    assert not (routing.kept_TK & ~routing.proposed_TK).any()
    aff_TE = grap_affinity(x, 4)
    proposed_TE = slots_to_mask(routing.expert_ids_TK, routing.proposed_TK, 4)
    kept_TE = slots_to_mask(routing.expert_ids_TK, routing.kept_TK, 4)
    assert torch.equal(kept_TE, expert_choice(aff_TE, cap, proposed_TE))
    assert (routing.weights_TK[~routing.kept_TK] == 0).all()
    assert routing.extras["rearranged_fraction"] == pytest.approx(
        float((~routing.kept_TK & routing.proposed_TK).any(-1).float().mean())
    )


def test_false_positive_counts_closed_form():
    aff_TE = torch.tensor([[0.9, 0.0], [0.5, 0.1], [0.7, 0.8], [0.95, 0.2]])
    proposed_TE = torch.tensor([[True, False], [True, False], [False, True], [False, False]])
    # expert 0: candidates 0.9, 0.5 -> typical 0.7; non-proposers above it: 0.95 only (0.7 ties)
    # expert 1: single candidate 0.8; nobody above -> 0
    assert false_positive_counts(aff_TE, proposed_TE).tolist() == [1, 0]
    assert false_positive_counts(aff_TE, torch.zeros_like(proposed_TE)).tolist() == [0, 0]


# ------------------------------------------------------------------------------------------- losses


def test_locality_loss_is_zero_at_target_and_finite_elsewhere():
    target = locality_target([0, 0, 1, 1], local_node=0, smoothing=0.2)
    torch.testing.assert_close(target, torch.tensor([0.45, 0.45, 0.05, 0.05]))
    gate_at_target = target.expand(7, 4)
    assert locality_loss(gate_at_target, target).abs() < 1e-6
    one_hot_remote = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(5, 4)
    loss = locality_loss(one_hot_remote, target)
    assert torch.isfinite(loss) and loss == pytest.approx(math.log(1 / 0.05), rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), smoothing=st.floats(0.01, 1.0))
def test_locality_loss_nonnegative_and_finite(seed, smoothing):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.softmax(torch.randn(9, 6, generator=gen) * 10, dim=-1)
    loss = locality_loss(gate, locality_target([0, 1, 2, 0, 1, 2], 1, smoothing))
    assert torch.isfinite(loss) and loss >= -1e-6


def test_router_aux_losses_and_expert_node_validation():
    router = make_router(expert_nodes=[0, 0, 1, 1], local_node=1, locality_smoothing=0.1)
    routing = router(torch.randn(30, 16))
    assert set(routing.aux_losses) == {"load_balance", "z_loss", "locality"}
    assert all(torch.isfinite(v) for v in routing.aux_losses.values())
    with pytest.raises(ConfigError, match="expert_nodes"):
        make_router(expert_nodes=[0, 1])
    with pytest.raises(ConfigError, match="local_node"):
        make_router(expert_nodes=[0, 0, 1, 1], local_node=5)


# ---------------------------------------------------------------------------------------- schedules


def test_fixed_schedule_is_constant():
    schedule = FixedCapacity(CapacityConfig(factor=0.8, floor=0.5))
    for _ in range(5):
        schedule.observe(obs())
        assert schedule.factor == 0.8


def test_annealed_by_steps_is_monotone_and_reaches_the_floor():
    schedule = AnnealedCapacity(CapacityConfig(schedule="annealed", factor=1.1, floor=0.66, anneal_steps=10))
    factors = [schedule.factor]
    for _ in range(15):
        schedule.observe(obs())
        factors.append(schedule.factor)
    assert all(b <= a for a, b in zip(factors, factors[1:]))
    assert factors[0] == 1.1 and factors[-1] == pytest.approx(0.66)
    assert factors[5] == pytest.approx(1.1 + (0.66 - 1.1) * 0.5)


@settings(max_examples=25, deadline=None)
@given(rearranged=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200))
def test_annealed_by_settling_is_monotone_and_bounded(rearranged):
    cfg = CapacityConfig(schedule="annealed", anneal_by="settle", settle_window=5, settle_tol=0.05)
    schedule = AnnealedCapacity(cfg)
    previous = schedule.factor
    for r in rearranged:
        schedule.observe(obs(rearranged=r))
        assert cfg.floor <= schedule.factor <= previous
        previous = schedule.factor


def test_annealed_by_settling_moves_only_when_settled():
    cfg = CapacityConfig(
        schedule="annealed", anneal_by="settle", settle_window=4, settle_tol=0.01, settle_decrement=0.1
    )
    noisy = AnnealedCapacity(cfg)
    for i in range(40):
        noisy.observe(obs(rearranged=float(i % 8 < 4)))
    assert noisy.factor == pytest.approx(1.1)
    steady = AnnealedCapacity(cfg)
    for _ in range(200):
        steady.observe(obs(rearranged=0.2))
    assert steady.factor == pytest.approx(cfg.floor)


def test_false_positive_schedule_tracks_the_measured_rate_within_bounds():
    cfg = CapacityConfig(schedule="fpr", factor=1.1, floor=0.5, fpr_margin=2.0, fpr_ema=0.0)
    schedule = FalsePositiveCapacity(cfg)
    estimates = [schedule.estimate(obs(fp=fp, tpe=10.0)) for fp in (0.0, 1.0, 2.0, 3.0, 4.0, 10.0)]
    assert estimates == pytest.approx([0.5, 0.5, 0.5, 0.6, 0.8, 1.1])
    assert all(b >= a for a, b in zip(estimates, estimates[1:]))
    schedule.observe(obs(fp=4.0))
    assert schedule.factor == pytest.approx(0.8)


def test_router_schedule_advances_on_step_after_training_forwards_only():
    router = make_router(capacity={"schedule": "annealed", "factor": 1.1, "floor": 0.66, "anneal_steps": 4})
    x = torch.randn(40, 16)
    seen = []
    for _ in range(6):
        seen.append(router(x).extras["capacity_factor"])
        assert router.capacity_factor == seen[-1]  # forward alone never moves the schedule
        router.step()
    assert seen[0] == 1.1 and seen[1] == pytest.approx(1.1 - 0.44 / 4) and seen[-1] == pytest.approx(0.66)
    router.eval()
    assert router(x).extras["capacity_factor"] == pytest.approx(0.66)
    assert router.capacity_factor == pytest.approx(0.66)
    fresh = make_router(capacity={"schedule": "annealed", "anneal_steps": 4})
    fresh.eval()
    fresh(x)
    fresh.step()  # nothing observed in training: no step
    assert fresh.capacity_factor == 1.1


def test_step_feeds_the_schedule_the_pooled_training_statistics():
    router = make_router(top_k=2, score_threshold=0.8, capacity={"factor": 0.5})
    batches = [torch.randn(n, 16) for n in (30, 50)]
    routings = [router(x) for x in batches]
    seen = []
    router.schedule.observe = seen.append
    router.step()
    rearranged = sum(float(r.extras["rearranged_fraction"]) * r.num_tokens for r in routings)
    false_pos = sum(
        float(false_positive_counts(r.logits_TE, slots_to_mask(r.expert_ids_TK, r.proposed_TK, 4)).sum())
        for r in routings
    )
    assert len(seen) == 1
    assert seen[0].rearranged_fraction == pytest.approx(rearranged / 80)
    assert seen[0].false_positives_per_expert == pytest.approx(false_pos / 4)
    assert seen[0].tokens_per_expert == pytest.approx(80 * 2 / 4)
    router.step()
    assert len(seen) == 1


def test_router_capacity_factor_defaults_to_the_shared_field():
    router = RouterConfig(name="etr", top_k=1, capacity_factor=1.25).build(16, 4)
    assert router.capacity_factor == 1.25
    assert ETRRouterConfig(capacity_factor=0.5).capacity == CapacityConfig(factor=0.5, floor=0.5)
    assert ETRRouterConfig(capacity_factor=0.8, capacity=CapacityConfig(factor=0.8)).capacity.factor == 0.8
    with pytest.raises(ConfigError, match="router.capacity_factor: conflicts"):
        ETRRouterConfig(capacity_factor=0.8, capacity=CapacityConfig(factor=0.9))
    with pytest.raises(ConfigError, match="router.capacity.floor"):
        make_router(capacity={"schedule": "annealed", "factor": 0.5, "floor": 0.9})
    with pytest.raises(ConfigError, match="router.bogus: unknown field; allowed fields are .*temperature"):
        make_router(bogus=1)
    with pytest.raises(ConfigError, match="router.temperature"):
        ETRRouterConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="model.moe.router.capacity.fpr_ema") as exc:
        from_dict(
            MoEConfig,
            {
                "dim": 16,
                "hidden_dim": 8,
                "num_experts": 4,
                "router": {"name": "etr", "capacity": {"fpr_ema": 2}},
            },
            prefix="model.moe",
        )
    assert exc.value.field == "model.moe.router.capacity.fpr_ema"


# ------------------------------------------------------------------------------------------- layer


@pytest.mark.parametrize("executor", EXECUTORS.names())
@pytest.mark.parametrize("training", [True, False])
def test_layer_with_every_executor_matches_the_per_slot_reference(executor, training):
    torch.manual_seed(3)
    router = ETRRouterConfig(
        top_k=2, renormalize=False, score_threshold=0.7, capacity=CapacityConfig(factor=0.6)
    )
    layer = MoEConfig(dim=16, hidden_dim=24, num_experts=4, router=router, executor=executor).build()
    layer.train(training)
    x = torch.randn(48, 16, requires_grad=True)
    out, routing = layer(x)
    reference = torch.zeros_like(x)
    for t, k in routing.kept_TK.nonzero().tolist():
        e = int(routing.expert_ids_TK[t, k])
        reference[t] += routing.weights_TK[t, k] * layer.experts.expert_forward(x[t : t + 1], e)[0]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert (routing.capacity is None) == (not training)
    unrouted = ~routing.kept_TK.any(-1)
    assert (out[unrouted] == 0).all()
    (out.square().sum() + routing.aux_losses["load_balance"]).backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.experts.parameters())


def test_single_phase_ablations():
    torch.manual_seed(4)
    x = torch.randn(64, 16)
    aff_TE = grap_affinity(x, 4)
    token_only = make_router(selection="token", capacity={"factor": 0.5})
    routing = token_only(x)
    cap = expert_capacity(0.5, 64, 4)
    first = routing.expert_ids_TK[:, 0]
    position_TE = torch.nn.functional.one_hot(first, 4).cumsum(0) - 1
    expected = position_TE.gather(-1, first[:, None]).squeeze(-1) < cap
    assert torch.equal(routing.kept_TK[:, 0], expected)
    expert_only = make_router(selection="expert", capacity={"factor": 0.5})
    for training in (True, False):
        expert_only.train(training)
        routing = expert_only(x)
        assert routing.capacity == cap and routing.top_k == 4
        assert torch.equal(routing.kept_TK, expert_choice(aff_TE, cap))


def test_external_routing_uses_the_etr_gate_and_leaves_the_schedule_alone():
    router = make_router(capacity={"schedule": "annealed", "anneal_steps": 2})
    x = torch.randn(12, 16)
    ids = torch.randint(0, 4, (12, 1))
    routing = router(x, expert_ids_TK=ids)
    assert torch.equal(routing.expert_ids_TK, ids) and routing.kept_TK.all()
    torch.testing.assert_close(routing.weights_TK, routing.scores_TE.gather(1, ids))
    assert router.capacity_factor == 1.1


def test_schedule_progress_survives_a_state_dict_round_trip():
    options = {"capacity": {"schedule": "annealed", "anneal_by": "settle", "settle_window": 2}}
    router = make_router(**options)
    for _ in range(9):
        router(torch.randn(32, 16))
        router.step()
    assert router.schedule.step == 9
    fresh = make_router(**options)
    fresh.load_state_dict(router.state_dict())
    assert vars(fresh.schedule) == vars(router.schedule) and fresh.capacity_factor == router.capacity_factor
