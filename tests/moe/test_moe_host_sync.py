"""The MoE forward reads nothing back to the host, apart from the executor sizing its GEMMs.

Every way a tensor value reaches Python (``item``, ``tolist``, ``bool``/``int``/``float``, indexing
with a tensor, ``nonzero``) is made to raise while the layer runs; only the expert executor may read
(on an accelerator these reads are device syncs that stall the launch queue). Independently, every
router traces as one graph under ``torch.compile(fullgraph=True)``, where a read would be a break.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from edgemoe.moe import ExpertExecutor, MoEConfig, RouterConfig
from edgemoe.moe.etr import ETRRouterConfig
from edgemoe.moe.routing import Routing

READS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


class HostReadGuard:
    """While ``armed``, every tensor read-back raises ``AssertionError`` naming the method."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.armed = False
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._guarded(name, getattr(torch.Tensor, name)))

    def _guarded(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.armed:
                raise AssertionError(f"host read Tensor.{name} inside the MoE forward")
            return original(tensor, *args, **kwargs)

        return method

    @contextlib.contextmanager
    def disarmed(self):
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed


class ReadsAllowed(ExpertExecutor):
    """The layer's executor, with host reads allowed while it runs (it sizes its GEMMs)."""

    def __init__(self, inner: ExpertExecutor, guard: HostReadGuard):
        self.inner = inner
        self.guard = guard

    def __call__(self, experts, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        with self.guard.disarmed():
            return self.inner(experts, x_TD, routing)


ROUTERS = {
    "topk dropless": RouterConfig(top_k=2),
    "topk capped by score": RouterConfig(top_k=2, capacity_factor=1.0, drop_priority="score"),
    "topk dynamic capacity": RouterConfig(top_k=2, capacity_factor=-0.5, score_func="sigmoid"),
    "expert choice": RouterConfig(name="expert_choice", capacity_factor=1.0),
    "etr bidirectional": ETRRouterConfig(top_k=2, score_threshold=0.8, capacity_factor=0.6),
    "etr token": ETRRouterConfig(top_k=2, selection="token", capacity_factor=0.6),
    "etr expert": ETRRouterConfig(selection="expert", capacity_factor=0.6),
}


def test_the_guard_catches_a_host_read(monkeypatch):
    guard = HostReadGuard(monkeypatch)
    guard.armed = True
    for read in (lambda t: bool(t), lambda t: t.item(), lambda t: t.tolist(), lambda t: int(t)):
        with pytest.raises(AssertionError, match="host read"):
            read(torch.ones(()))
    with guard.disarmed():
        assert bool(torch.ones(()))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("executor", ["sorted", "padded", "loop"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_forward_has_no_host_reads_outside_the_executor(monkeypatch, router, executor, training):
    torch.manual_seed(0)
    layer = MoEConfig(dim=16, hidden_dim=8, num_experts=4, router=ROUTERS[router], executor=executor).build()
    layer.train(training)
    guard = HostReadGuard(monkeypatch)
    layer.executor = ReadsAllowed(layer.executor, guard)
    x = torch.randn(3, 20, 16, requires_grad=True)
    guard.armed = True
    out, routing = layer(x)
    guard.armed = False
    # Telemetry stays on the device until read; reading it afterwards is fine.
    assert all(isinstance(v, torch.Tensor) for k, v in routing.extras.items() if k != "capacity_factor")
    assert routing.stats.as_dict()["kept"] > 0
    out.sum().backward()
    layer.step()
    assert out.shape == x.shape


def test_the_debug_check_is_the_one_read_it_adds(monkeypatch):
    layer = MoEConfig(dim=16, hidden_dim=8, num_experts=4, check_finite=True).build()
    guard = HostReadGuard(monkeypatch)
    layer.executor = ReadsAllowed(layer.executor, guard)
    guard.armed = True
    with pytest.raises(AssertionError, match="Tensor.__bool__"):
        layer(torch.randn(5, 16))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_traces_as_one_graph(router, training):
    """A host read inside the router would be a graph break, which ``fullgraph=True`` turns into an error."""
    torch._dynamo.reset()  # each case compiles Router.forward afresh (the recompile limit is per code)
    torch.manual_seed(0)
    built = ROUTERS[router].build(16, 4)
    built.train(training)
    x = torch.randn(40, 16)
    traced = torch.compile(built, fullgraph=True, backend="eager")
    routing, reference = traced(x), built(x)
    assert torch.equal(routing.kept_TK, reference.kept_TK)
    torch.testing.assert_close(routing.weights_TK, reference.weights_TK)
