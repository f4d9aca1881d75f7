"""The ``sorted`` backend's step-to-step reuse: exact against ``loop``, safe for optimizers and autograd.

Reused storage (activation rows, weight gradients) must never change what a user can observe:
gradients equal the ``loop`` backend's to double-precision round-off under every ``zero_grad``
convention, a gradient someone still holds is never overwritten, a retained graph backpropagates
again, and a compiled layer gives the eager outputs and gradients.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.moe import MoEConfig, MoELayer, RouterConfig
from edgemoe.moe.backends import LoopExecutor, SortedExecutor, build_executor

TIGHT = {"rtol": 1e-12, "atol": 1e-12}

# One executor instance per name for the whole module, as a layer keeps its own across steps.
executor_named = functools.cache(build_executor)


def make_layer(num_experts=6, top_k=2, cf=0.0, kind="swiglu", dim=10, hidden=14, backend="sorted"):
    torch.manual_seed(0)
    router = RouterConfig(top_k=top_k, capacity_factor=cf)
    cfg = MoEConfig(
        dim=dim, hidden_dim=hidden, num_experts=num_experts, router=router, expert=kind, executor=backend
    )
    return MoELayer(cfg).double()


def loss_of(layer, x, g, backend):
    out, _ = layer(x, executor=executor_named(backend))
    return (out * g).sum()


def grads_of(layer, x, g, backend):
    """[input grad, *parameter grads] of one fresh backward, as independent copies."""
    xx = x.detach().clone().requires_grad_(True)
    params = list(layer.parameters())
    got = torch.autograd.grad(loss_of(layer, xx, g, backend), [xx, *params])
    return [t.clone() for t in got]


@settings(max_examples=25, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    cf=st.sampled_from([0.0, 0.5, 1.0, -0.7]),
    kind=st.sampled_from(["swiglu", "mlp"]),
    strategy=st.sampled_from(["auto", "grid", "split"]),
    seed=st.integers(0, 2**16),
)
def test_sorted_equals_loop_to_round_off(num_tokens, num_experts, k_frac, cf, kind, strategy, seed):
    top_k = 1 + int(k_frac * (num_experts - 1))
    layer = make_layer(num_experts=num_experts, top_k=top_k, cf=cf, kind=kind)
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, 10, dtype=torch.double, requires_grad=True)
    g = torch.randn(num_tokens, 10, dtype=torch.double)
    params = [x, *layer.parameters()]
    results = []
    for backend in (LoopExecutor(), SortedExecutor(strategy)):
        routing = layer.router(x)
        out = backend(layer.experts, x, routing)
        results.append([out, *torch.autograd.grad((out * g).sum(), params, allow_unused=True)])
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **TIGHT)


def w_in_grad(layer, x, g, backend):
    names = ["x", *(name for name, _ in layer.named_parameters())]
    return grads_of(layer, x, g, backend)[names.index("experts.w_in_EDF")]


def test_skewed_loads_use_a_tail_grid_and_stay_exact():
    from edgemoe.moe.dispatch import sort_by_expert
    from edgemoe.moe.grouped import choose_layout

    layer = make_layer(num_experts=8, top_k=2)
    torch.manual_seed(3)
    # Experts 0 and 5 get most tokens; the others a few each: grid of the typical load + a tail.
    first = torch.where(torch.rand(120) < 0.5, 0, 5)
    second = torch.randint(1, 5, (120,))
    ids = torch.stack([first, second], dim=1)
    x = torch.randn(120, 10, dtype=torch.double, requires_grad=True)
    g = torch.randn(120, 10, dtype=torch.double)
    routing = layer.router(x, expert_ids_TK=ids)
    layout = choose_layout(sort_by_expert(routing))
    assert layout.tail is not None and {0, 5} <= set(layout.tail.experts_M.tolist())
    params = [x, *layer.parameters()]
    results = []
    for backend in ("loop", "sorted"):
        out, _ = layer(x, expert_ids_TK=ids, executor=executor_named(backend))
        results.append([out, *torch.autograd.grad((out * g).sum(), params)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **TIGHT)


def test_weight_gradients_reuse_storage_across_zero_grad_steps():
    layer = make_layer()
    w_in = layer.experts.w_in_EDF
    x, g = torch.randn(50, 10, dtype=torch.double), torch.randn(50, 10, dtype=torch.double)
    ptrs = []
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        loss_of(layer, x, g, "sorted").backward()
        ptrs.append(w_in.grad.data_ptr())
        torch.testing.assert_close(w_in.grad, w_in_grad(layer, x, g, "loop"), **TIGHT)
    assert ptrs[0] == ptrs[1] == ptrs[2]


def test_a_held_gradient_is_never_overwritten():
    layer = make_layer()
    x1, x2 = torch.randn(40, 10, dtype=torch.double), torch.randn(40, 10, dtype=torch.double)
    g = torch.randn(40, 10, dtype=torch.double)
    loss_of(layer, x1, g, "sorted").backward()
    held = layer.experts.w_in_EDF.grad
    snapshot = held.clone()
    layer.zero_grad(set_to_none=True)
    loss_of(layer, x2, g, "sorted").backward()
    torch.testing.assert_close(held, snapshot, rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w_in_EDF.grad, w_in_grad(layer, x2, g, "loop"), **TIGHT)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_trajectory_matches_loop(set_to_none):
    x, g = torch.randn(64, 10, dtype=torch.double), torch.randn(64, 10, dtype=torch.double)
    finals = []
    for backend in ("loop", "sorted"):
        layer = make_layer(backend=backend)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        for step in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            # Two micro-batches accumulate into .grad before each step.
            loss_of(layer, x[:32], g[:32], backend).backward()
            loss_of(layer, x[32:], g[32:] * (step + 1), backend).backward()
            opt.step()
        finals.append([p.detach().clone() for p in layer.parameters()])
    for got, want in zip(finals[1], finals[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_retained_graph_backpropagates_again():
    layer = make_layer()
    x = torch.randn(30, 10, dtype=torch.double, requires_grad=True)
    g = torch.randn(30, 10, dtype=torch.double)
    params = [x, *layer.parameters()]
    want = grads_of(layer, x, g, "loop")
    loss = loss_of(layer, x, g, "sorted")
    first = [t.clone() for t in torch.autograd.grad(loss, params, retain_graph=True)]
    second = torch.autograd.grad(loss, params)
    for a, b, w in zip(first, second, want):
        torch.testing.assert_close(a, w, **TIGHT)
        torch.testing.assert_close(b, w, **TIGHT)


def test_one_layer_used_twice_in_one_graph():
    layer = make_layer()
    x = torch.randn(25, 10, dtype=torch.double)
    g = torch.randn(25, 10, dtype=torch.double)

    def twice(backend):
        xx = x.clone().requires_grad_(True)
        out1, _ = layer(xx, executor=executor_named(backend))
        out2, _ = layer(torch.tanh(out1), executor=executor_named(backend))
        return [t.clone() for t in torch.autograd.grad((out2 * g).sum(), [xx, *layer.parameters()])]

    for got, want in zip(twice("sorted"), twice("loop")):
        torch.testing.assert_close(got, want, **TIGHT)


def test_inference_forward_matches_and_keeps_buffers_for_reuse():
    layer = make_layer()
    x = torch.randn(33, 10, dtype=torch.double)
    with torch.no_grad():
        want, _ = layer(x, executor=executor_named("loop"))
        got, _ = layer(x, executor=executor_named("sorted"))
        again, _ = layer(x, executor=executor_named("sorted"))
    torch.testing.assert_close(got, want, **TIGHT)
    torch.testing.assert_close(again, want, **TIGHT)
    assert len(layer.experts.row_buffers._free) > 0


def test_inference_mode_and_training_steps_alternate():
    layer = make_layer()
    x = torch.randn(21, 10, dtype=torch.double)
    g = torch.randn(21, 10, dtype=torch.double)
    want = grads_of(layer, x, g, "loop")
    for _ in range(2):
        with torch.inference_mode():
            out, _ = layer(x, executor=executor_named("sorted"))
        torch.testing.assert_close(out, layer(x, executor=executor_named("loop"))[0].detach(), **TIGHT)
        for got, ref in zip(grads_of(layer, x, g, "sorted"), want):
            torch.testing.assert_close(got, ref, **TIGHT)


def test_compiled_default_backend_gives_eager_outputs_and_gradients():
    layer = make_layer(backend="auto").float()
    x = torch.randn(2, 24, 10)
    g = torch.randn(2, 24, 10)
    # aot_eager runs dynamo and AOT autograd like the default inductor backend, minus its C++
    # code generation (inductor gives the same result but compiles for ~25 s of CPU).
    compiled = torch.compile(layer, backend="aot_eager")
    results = []
    for module in (layer, compiled, compiled):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out, routing = module(xx)
        (out * g).sum().backward()
        results.append([out.detach(), xx.grad, *[p.grad.clone() for p in layer.parameters()]])
    for run in results[1:]:
        for got, want in zip(run, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_experts_keep_the_module_buffer_api():
    """The reused row storage is not module state and does not hide ``nn.Module.buffers()``."""
    layer = make_layer()
    loss_of(layer, torch.randn(9, 10, dtype=torch.double), torch.randn(9, 10, dtype=torch.double), "sorted")
    assert list(layer.experts.buffers()) == [] and "experts.w_in_EDF" in layer.state_dict()
