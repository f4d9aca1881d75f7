"""MoELayer behaviour: dense equivalence, executor agreement, external routing, shapes."""

import pytest
import torch

from edgemoe.moe import EXECUTORS, MoEConfig, MoELayer, RouterConfig, build_executor

EXECUTOR_NAMES = EXECUTORS.names()


def make_layer(kind="swiglu", num_experts=4, top_k=2, cf=0.0, name="topk", dim=12, hidden=20, **router_kw):
    torch.manual_seed(0)
    router = RouterConfig(name=name, top_k=top_k, capacity_factor=cf, **router_kw)
    cfg = MoEConfig(dim=dim, hidden_dim=hidden, num_experts=num_experts, router=router, expert=kind)
    return MoELayer(cfg).double()


def run(layer, x, g, **kw):
    """Output and gradients (input, then every parameter) of loss (out*g).sum()."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, routing = layer(x, **kw)
    (out * g).sum().backward()
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return out.detach(), grads, routing


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_k_equals_e_matches_dense_weighted_sum(kind, score_func):
    layer = make_layer(kind=kind, num_experts=3, top_k=3, score_func=score_func, renormalize=False)
    x = torch.randn(2, 9, 12, dtype=torch.double)
    g = torch.randn(2, 9, 12, dtype=torch.double)

    def dense(x_in):
        x_TD = x_in.reshape(-1, 12)
        _, scores_TE = layer.router.gate(x_TD)
        return torch.einsum("te,etd->td", scores_TE, layer.experts.dense_forward(x_TD)).view(x_in.shape)

    ref_x = x.clone().requires_grad_(True)
    ref = dense(ref_x)
    (ref * g).sum().backward()
    ref_grads = [ref_x.grad] + [p.grad for p in layer.parameters()]
    for name in EXECUTOR_NAMES:
        out, grads, _ = run(layer, x, g, executor=build_executor(name))
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize(
    ("name", "top_k", "cf"),
    [("topk", 2, 0.0), ("topk", 1, 1.0), ("topk", 2, -0.7), ("expert_choice", 1, 1.5)],
)
def test_executors_agree_fwd_and_grads(kind, name, top_k, cf):
    layer = make_layer(kind=kind, num_experts=5, top_k=top_k, cf=cf, name=name).float()
    x = torch.randn(61, 12)
    g = torch.randn(61, 12)
    ref_out, ref_grads, _ = run(layer, x, g, executor=build_executor("loop"))
    for executor in EXECUTOR_NAMES:
        out, grads, _ = run(layer, x, g, executor=build_executor(executor))
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unrouted_tokens_get_zero_output_and_experts_with_no_tokens_zero_grad():
    layer = make_layer(num_experts=4, top_k=1)
    x = torch.randn(6, 12, dtype=torch.double)
    ids = torch.tensor([[0], [0], [-1], [2], [-1], [0]])
    for name in EXECUTOR_NAMES:
        out, grads, routing = run(
            layer, x, torch.ones(6, 12, dtype=torch.double), expert_ids_TK=ids, executor=build_executor(name)
        )
        assert torch.all(out[2] == 0) and torch.all(out[4] == 0)
        w_in_grad = grads[2]
        assert torch.all(w_in_grad[1] == 0) and torch.all(w_in_grad[3] == 0)
        assert routing.stats.tokens_per_expert_E.tolist() == [3, 0, 1, 0]
        assert float(routing.stats.unrouted_fraction) == pytest.approx(2 / 6)


def test_external_routing_weights_come_from_gate_scores():
    layer = make_layer(num_experts=4, top_k=2)
    x = torch.randn(5, 12, dtype=torch.double)
    ids = torch.tensor([[3, 1], [0, 2], [1, 3], [2, 0], [0, 1]])
    out, routing = layer(x, expert_ids_TK=ids)
    _, scores_TE = layer.router.gate(x)
    gate_TK = scores_TE.gather(1, ids)
    torch.testing.assert_close(routing.weights_TK, gate_TK / gate_TK.sum(-1, keepdim=True))
    assert torch.equal(routing.expert_ids_TK, ids)
    expected = sum(
        routing.weights_TK[:, j, None]
        * torch.stack([layer.experts.expert_forward(x[t : t + 1], int(ids[t, j]))[0] for t in range(5)])
        for j in range(2)
    )
    torch.testing.assert_close(out, expected)
    # The gate still learns from the task loss under external routing.
    out.sum().backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0
    assert set(routing.aux_losses) == {"load_balance", "z_loss"}


def test_external_routing_rejects_bad_ids():
    layer = make_layer(num_experts=4)
    x = torch.randn(3, 12, dtype=torch.double)
    with pytest.raises(ValueError, match="expert_ids_TK"):
        layer(x, expert_ids_TK=torch.tensor([[0, 4]] * 3))
    with pytest.raises(ValueError, match="expert_ids_TK"):
        layer(x, expert_ids_TK=torch.tensor([[0, 1]] * 2))


def test_batch_shape_is_preserved_and_auto_executor_runs():
    layer = make_layer()
    x = torch.randn(3, 4, 12, dtype=torch.double)
    out, routing = layer(x)
    assert out.shape == x.shape
    assert routing.expert_ids_TK.shape == (12, 2)
    assert routing.stats.as_dict()["kept"] == 24.0


@pytest.mark.parametrize("strategy", ["grid", "split"])
@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_sorted_executor_grid_and_split_layouts_match_loop(strategy, cf):
    from edgemoe.moe.backends import LoopExecutor, SortedExecutor

    layer = make_layer(num_experts=6, top_k=2, cf=cf).float()
    x = torch.randn(50, 12)
    g = torch.randn(50, 12)
    results = []
    for executor in (LoopExecutor(), SortedExecutor(strategy)):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        routing = layer.router(xx)
        out = executor(layer.experts, xx, routing)
        (out * g).sum().backward()
        results.append([out.detach(), xx.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layout_choice_follows_padding_waste():
    from edgemoe.moe.dispatch import SortedPlan
    from edgemoe.moe.grouped import choose_layout

    def plan(counts):
        n = sum(counts)
        ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        return SortedPlan(torch.arange(n), ids, torch.arange(n), torch.arange(n).view(n, 1), counts, n)

    assert choose_layout(plan([10, 10, 9, 11])).grid == (4, 11)
    assert choose_layout(plan([40, 0, 0, 0])).grid is None


@pytest.mark.parametrize("name", EXECUTOR_NAMES)
def test_no_kept_slot_and_no_tokens_give_zeros(name):
    layer = make_layer(num_experts=4)
    layer.executor = build_executor(name)
    x = torch.randn(5, 12, dtype=torch.double, requires_grad=True)
    out, routing = layer(x, expert_ids_TK=torch.full((5, 2), -1))
    out.sum().backward()
    assert not out.any() and not x.grad.any()
    assert float(routing.stats.unrouted_fraction) == 1.0
    empty, _ = layer(torch.randn(0, 12, dtype=torch.double))
    assert empty.shape == (0, 12)


def test_sorted_executor_buffer_reuse_across_steps_stays_exact():
    layer = make_layer(num_experts=4, top_k=2).float()
    loop, sorted_ = build_executor("loop"), build_executor("sorted")
    for num_tokens in (40, 37, 52, 40):
        x = torch.randn(num_tokens, 12)
        g = torch.randn(num_tokens, 12)
        ref = run(layer, x, g, executor=loop)
        got = run(layer, x, g, executor=sorted_)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(got[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Two forwards before their backwards (gradient accumulation order) are independent.
    x1, x2 = torch.randn(30, 12, requires_grad=True), torch.randn(30, 12, requires_grad=True)
    out1, _ = layer(x1, executor=sorted_)
    out2, _ = layer(x2, executor=sorted_)
    out1.sum().backward()
    out2.sum().backward()
    ref1, ref2 = layer(x1, executor=loop)[0], layer(x2, executor=loop)[0]
    torch.testing.assert_close(out1, ref1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2, ref2, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ref1.sum() + ref2.sum(), [x1, x2])
    torch.testing.assert_close(x1.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, grads[1], rtol=1e-5, atol=1e-5)


def test_layer_builds_and_keeps_one_executor():
    cfg = MoEConfig(dim=12, hidden_dim=20, num_experts=4, executor="padded")
    layer = cfg.build()
    executor = layer.executor
    assert type(executor).__name__ == "PaddedExecutor"
    layer(torch.randn(6, 12))
    layer(torch.randn(6, 12))
    assert layer.executor is executor
    assert type(MoEConfig(dim=12, hidden_dim=20, num_experts=4).build().executor).__name__ == "SortedExecutor"
