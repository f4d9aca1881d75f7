"""What makes routing matter in training: no popularity prior in the model, a gate gradient at
K = 1, a learned inference routing bias that survives checkpoints, token-level routing that
conserves tokens, one slot engine for trainer and simulator, and the diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemoe.edge import spec_from_dict
from edgemoe.edge.simulator import PolicySpec, simulate
from edgemoe.edge.spec import SCENARIOS
from edgemoe.testing.train import tiny_train_config as tiny
from edgemoe.train.config import train_config_from_dict
from edgemoe.train.model import ModelConfig, RouterSide
from edgemoe.train.trainer import Trainer, mutual_information_bits, token_spec


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scenario=st.sampled_from(sorted(SCENARIOS)),
    skew=st.floats(0.0, 6.0),
    popular=st.sampled_from(["slow", "fast"]),
)
def test_no_prior_reaches_the_model(digits, scenario, skew, popular):
    """The scenario's skew changes only what the controller sees: the model (and so training
    targets and inference) is the same with and without it."""
    base = {"slots": 1, "scenario": scenario, "model": {"dim": 8, "expert_hidden": 8, "channels": 4}}
    base["network"] = {"scores": {"kind": "skewed", "skew": skew, "popular": popular}}
    with_prior = Trainer(train_config_from_dict(dict(base, gate_prior="scenario")), dataset=digits)
    without = Trainer(train_config_from_dict(dict(base, gate_prior="none")), dataset=digits)
    a, b = with_prior.model.state_dict(), without.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("prior" in k for k in a)
    x = digits.x_test_NCHW[:16]
    h = with_prior.model.features(x)
    scores = with_prior.model.gate(h)[1]
    assert torch.equal(scores, with_prior.model.router.gate(h)[1])
    assert with_prior.evaluate() == without.evaluate()
    view = with_prior.controller_view(scores.detach().numpy())
    np.testing.assert_allclose(view.sum(axis=1), 1.0, rtol=1e-5)
    if skew > 0.05:
        assert not np.allclose(view, scores.detach().numpy())


@pytest.mark.parametrize("k", [1, 2])
def test_gate_learns_at_every_k(k):
    torch.manual_seed(0)
    model = RouterSide(
        ModelConfig(dim=8, channels=4), in_channels=1, image_size=8, num_classes=3, num_experts=4, top_k=k
    )
    h = torch.randn(32, 8)
    _, scores = model.gate(h)
    ids = scores.topk(k, dim=-1).indices
    y = torch.randn(32, k, 8)
    kept = torch.ones_like(ids, dtype=torch.bool)
    loss = torch.nn.functional.cross_entropy(
        model.classify(h, scores, ids, y, kept), torch.randint(0, 3, (32,))
    )
    loss.backward()
    grad = model.router.gate_proj.weight.grad if hasattr(model.router, "gate_proj") else None
    grads = [p.grad for p in model.router.parameters() if p.grad is not None]
    assert grads, grad
    assert max(float(g.abs().max()) for g in grads) > 1e-4
    # forward values are the renormalised weights (1 at K = 1)
    with torch.no_grad():
        gate = scores.gather(1, ids)
        w = gate / gate.sum(dim=-1, keepdim=True)
        mixed = (w.unsqueeze(-1) * y).sum(1) + h
        ref = model.head(model.norm(mixed))
        torch.testing.assert_close(model.classify(h, scores, ids, y, kept), ref)


def test_routing_bias_is_learned_and_round_trips(digits, tmp_path):
    cfg = train_config_from_dict(tiny(slots=6))
    tr = Trainer(cfg, dataset=digits)
    tr.run()
    bias = tr.model.route_bias_E.clone()
    assert bias.abs().max() > 0
    tr.save(tmp_path / "ckpt.pt")
    fresh = Trainer(cfg, dataset=digits)
    assert fresh.model.route_bias_E.abs().max() == 0
    fresh.resume(tmp_path / "ckpt.pt")
    assert torch.equal(fresh.model.route_bias_E, bias)
    assert fresh.evaluate() == tr.evaluate()
    assert fresh.evaluate(biased=False) == tr.evaluate(biased=False)


def test_bias_follows_the_controllers_load_share():
    """A gate that prefers expert 0 and a controller that sends everything to experts 2 and 3: the
    bias learns to route where the controller does."""
    model = RouterSide(
        ModelConfig(dim=4, channels=2, bias_rate=0.01),
        in_channels=1,
        image_size=8,
        num_classes=2,
        num_experts=4,
        top_k=2,
    )
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(50, 1)
    live = torch.ones(4, dtype=torch.bool)
    for _ in range(100):
        model.update_route_bias(scores, torch.tensor([0.0, 0.0, 50.0, 50.0]), live)
    assert sorted(model.route(scores, live)[0].tolist()) == [2, 3]


@pytest.mark.parametrize("buffer", [None, 6])
def test_token_level_routing_conserves_tokens(digits, buffer):
    cfg = tiny(
        policy="stable-moe",
        slots=8,
        buffer=buffer,
        model={"dim": 16, "expert_hidden": 16, "channels": 4, "tokens_per_sample": 4},
        faults=[{"server": 1, "slot": 3, "kind": "offline", "duration": 2}],
    )
    tr = Trainer(train_config_from_dict(cfg), dataset=digits, keep_decisions=True)
    tr.run()
    c = tr.counters
    assert c["tokens_arrived"] == 4 * c["arrived"] == tr.next_id
    assert c["tokens_trained"] + len(tr.table) == c["tokens_arrived"]
    assert c["trained"] + tr.table.num_samples() == c["arrived"]
    # every assignment is served, dropped or still queued, exactly once
    queued = int(tr.table.backlog_E(4).sum())
    assert c["served_assignments"] + c["dropped_assignments"] + queued == tr.k * c["tokens_arrived"]
    trained = np.concatenate([d.trained_ids for d in tr.decisions])
    assert len(np.unique(trained)) == len(trained) == c["tokens_trained"]
    # whole samples only: trained token ids come in complete groups of 4
    assert (np.sort(trained).reshape(-1, 4) % 4 == np.arange(4)).all()
    if buffer:
        assert c["dropped_assignments"] > 0
    assert 0.0 <= tr.evaluate() <= 1.0


def test_token_level_keeps_the_scenario_token_rate():
    one = train_config_from_dict(tiny())
    four = train_config_from_dict(
        tiny(model={"dim": 16, "expert_hidden": 16, "channels": 4, "tokens_per_sample": 4})
    )

    assert token_spec(four.network_spec(), 4).arrivals.rate * 4 == one.network_spec().arrivals.rate


@pytest.mark.parametrize("policy", ["stable-moe", "jsq-k", "bias-capacity"])
def test_trainer_and_simulator_share_queue_trajectories(digits, tmp_path, policy):
    """The simulator, replaying the gate scores the trainer recorded through the same slot engine,
    reproduces the trainer's queues and frequencies slot by slot."""
    cfg = tiny(
        policy=policy, slots=12, network={"servers": tiny()["network"]["servers"], "arrivals": {"rate": 30.0}}
    )
    tr = Trainer(train_config_from_dict(cfg), dataset=digits)
    tr.run()
    tr.save_scores(tmp_path / "scores.npz")
    spec = tr.spec.to_dict()
    spec["scores"] = {"kind": "replay", "trace": str(tmp_path / "scores.npz")}
    runs = simulate(spec_from_dict(spec), [PolicySpec(policy, policy, {"seed": 0})], 12, service="whole")
    sim = runs[policy]
    trained = np.array([r["backlog_E"] for r in tr.history])
    freq = np.array([r["freq_ghz_E"] for r in tr.history])
    assert trained.sum() > 0
    np.testing.assert_array_equal(sim["backlog"], trained)
    np.testing.assert_allclose(sim["freq"] / 1e9, freq)


def test_diagnostics(digits):
    tr = Trainer(train_config_from_dict(tiny(slots=4)), dataset=digits)
    tr.run()
    d = tr.diagnostics()
    for key in ("bias", "gate", "random", "zero"):
        assert 0.0 <= d[f"test_accuracy_{key}"] <= 1.0
    assert d["test_accuracy_bias"] == tr.evaluate()
    assert d["mi_train_bits"] >= 0 and d["mi_test_bits"] >= 0
    assert d["share_E"].shape == (4,) and d["share_E"].sum() == pytest.approx(1.0)


def test_mutual_information_closed_form():
    assert mutual_information_bits(np.eye(4) * 10) == pytest.approx(2.0)
    assert mutual_information_bits(np.ones((3, 5))) == pytest.approx(0.0)
    assert mutual_information_bits(np.zeros((2, 2))) == 0.0


def test_compare_passes_bias_rate_to_the_balancers_only():
    from edgemoe.experiments.compare import policy_config

    base = tiny(controller={"bias_rate": 0.02, "V": 5.0})
    assert policy_config(base, "bias-capacity", 0).controller == {"bias_rate": 0.02}
    assert policy_config(base, "jsq-k", 0).controller == {}
    assert policy_config(base, "stable-moe", 0).controller["V"] == 5.0
