"""Routers: capacity semantics and drop priority, expert choice, losses on hand-made logits."""

import math

import pytest
import torch

from edgemoe.moe import (
    MoEConfig,
    MoELayer,
    RouterConfig,
    apply_capacity,
    load_balance_loss,
    z_loss,
)

# Four tokens, two experts, top-2: expert 0 is every token's first choice except token 3's.
IDS_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
GATE_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
ALL_TK = torch.ones(4, 2, dtype=torch.bool)


def kept(cf, priority="position"):
    return apply_capacity(IDS_TK, GATE_TK, ALL_TK, cf, priority, num_experts=2)


def test_positive_capacity_factor_drops_by_position():
    kept_TK, cap = kept(0.5)  # C = ceil(0.5 * 2 * 4 / 2) = 2
    assert cap == 2
    # Expert 0: first choices of tokens 0, 1 win; token 2's first and token 3's second choice drop.
    # Expert 1: token 3's first choice, then the earliest second choice (token 0).
    assert kept_TK.tolist() == [[True, True], [True, False], [False, False], [True, False]]


def test_positive_capacity_factor_drops_by_score():
    kept_TK, cap = kept(0.5, "score")
    assert cap == 2
    # Expert 0 candidates by score: t2 .9, t1 .7, t0 .6, t3 .2; expert 1: t3 .8, t0 .4, t1 .3, t2 .1.
    assert kept_TK.tolist() == [[False, True], [True, False], [True, False], [True, False]]


def test_zero_capacity_factor_is_dropless():
    kept_TK, cap = kept(0.0)
    assert cap is None and kept_TK.all()


def test_negative_capacity_factor_is_dynamic_but_capped():
    kept_TK, cap = kept(-1.0)  # cap ceil(4) = 4 >= largest load 4: dropless, C = 4
    assert cap == 4 and kept_TK.all()
    kept_TK, cap = kept(-0.5)  # cap 2 < largest load 4: same drops as cf = 0.5
    assert cap == 2
    assert torch.equal(kept_TK, kept(0.5)[0])
    # A cap above the largest load shrinks to that load.
    ids = torch.tensor([[0], [1], [0], [1]])
    kept_TK, cap = apply_capacity(
        ids, torch.ones(4, 1), torch.ones(4, 1, dtype=torch.bool), -3.0, "position", 2
    )
    assert cap == 2 and kept_TK.all()


def test_topk_router_capacity_caps_every_expert():
    torch.manual_seed(1)
    router = RouterConfig(top_k=2, capacity_factor=1.0).build(dim=8, num_experts=4)
    routing = router(torch.randn(50, 8))
    cap = math.ceil(1.0 * 2 * 50 / 4)
    assert routing.capacity == cap
    assert int(routing.stats.tokens_per_expert_E.max()) <= cap
    assert int(routing.stats.kept + routing.stats.dropped) == 100
    assert not routing.weights_TK[~routing.kept_TK].any()


@pytest.mark.parametrize(("num_tokens", "cf"), [(40, 1.0), (37, 2.0), (10, 0.3)])
def test_expert_choice_takes_exactly_c_tokens_per_expert(num_tokens, cf):
    torch.manual_seed(2)
    router = RouterConfig(name="expert_choice", capacity_factor=cf).build(dim=8, num_experts=5)
    x = torch.randn(num_tokens, 8)
    routing = router(x)
    cap = max(1, math.ceil(cf * num_tokens / 5))
    assert routing.capacity == cap
    assert routing.stats.tokens_per_expert_E.tolist() == [cap] * 5
    # Each expert's tokens are its C highest-scoring ones.
    for e in range(5):
        chosen = set(torch.nonzero(routing.kept_TK[:, e]).flatten().tolist())
        best = set(torch.topk(routing.scores_TE[:, e], cap).indices.tolist())
        assert chosen == best
    picked = routing.kept_TK.any(-1)
    assert float(routing.stats.unrouted_fraction) == pytest.approx(1 - picked.float().mean().item())


def test_expert_choice_unpicked_tokens_pass_through_as_zero():
    torch.manual_seed(3)
    cfg = MoEConfig(
        dim=8, hidden_dim=8, num_experts=2, router=RouterConfig(name="expert_choice", capacity_factor=0.5)
    )
    layer = MoELayer(cfg)
    out, routing = layer(torch.randn(20, 8))
    unpicked = ~routing.kept_TK.any(-1)
    assert unpicked.any()
    assert torch.all(out[unpicked] == 0)


def test_load_balance_and_z_loss_closed_forms():
    logits_TE = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    scores_TE = torch.softmax(logits_TE, -1)  # every token [0.25, 0.75]
    ids_TK = torch.tensor([[1], [1]])
    # f = [0, 1], P = [0.25, 0.75] -> E * sum f P = 2 * 0.75
    assert float(load_balance_loss(scores_TE, ids_TK)) == pytest.approx(1.5)
    assert float(z_loss(logits_TE)) == pytest.approx(math.log(4.0) ** 2)
    # Uniform scores and balanced assignments give exactly 1.
    uniform_TE = torch.full((4, 4), 0.25)
    assert float(
        load_balance_loss(uniform_TE, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]))
    ) == pytest.approx(1.0)
    # Unproposed slots do not count in f.
    ids = torch.tensor([[0, 1], [0, 1]])
    proposed = torch.tensor([[True, False], [True, False]])
    scores = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    assert float(load_balance_loss(scores, ids, proposed)) == pytest.approx(2 * 0.7)


def test_topk_router_returns_both_aux_losses_with_gradient():
    router = RouterConfig(top_k=1).build(dim=6, num_experts=3)
    routing = router(torch.randn(7, 6))
    assert set(routing.aux_losses) == {"load_balance", "z_loss"}
    logits = router.proj(torch.randn(7, 6))
    assert logits.shape == (7, 3)
    (routing.aux_losses["load_balance"] + routing.aux_losses["z_loss"]).backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_jitter_only_while_training():
    torch.manual_seed(4)
    router = RouterConfig(top_k=1, jitter=0.5).build(dim=6, num_experts=3)
    x = torch.randn(30, 6)
    router.eval()
    a, b = router(x).scores_TE, router(x).scores_TE
    assert torch.equal(a, b)
    router.train()
    assert not torch.equal(router(x).scores_TE, a)
