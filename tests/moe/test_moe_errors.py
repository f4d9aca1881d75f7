"""Bad configuration and input raise ConfigError naming the field."""

import pytest
import torch

from edgemoe.config import ConfigError, from_dict
from edgemoe.moe import MoEConfig, MoELayer, RouterConfig, build_router


def field_of(excinfo):
    return excinfo.value.field


def test_top_k_larger_than_num_experts():
    with pytest.raises(ConfigError, match="num_experts") as exc:
        MoEConfig(dim=8, hidden_dim=8, num_experts=2, router=RouterConfig(top_k=3))
    assert field_of(exc) == "router.top_k"
    with pytest.raises(ConfigError) as exc:
        build_router(RouterConfig(top_k=5), dim=4, num_experts=4)
    assert field_of(exc) == "router.top_k"


@pytest.mark.parametrize("field", ["dim", "hidden_dim", "num_experts"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(field, value):
    kwargs = {"dim": 8, "hidden_dim": 8, "num_experts": 4, field: value}
    with pytest.raises(ConfigError, match="positive") as exc:
        MoEConfig(**kwargs)
    assert field_of(exc) == field


def test_unknown_backend_names_choices():
    with pytest.raises(ConfigError, match="sorted") as exc:
        MoEConfig(dim=8, hidden_dim=8, num_experts=4, backend="magic")
    assert field_of(exc) == "backend"
    layer = MoELayer(MoEConfig(dim=8, hidden_dim=8, num_experts=4))
    with pytest.raises(ConfigError) as exc:
        layer(torch.randn(3, 8), backend="magic")
    assert field_of(exc) == "backend"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_input(bad):
    layer = MoELayer(MoEConfig(dim=8, hidden_dim=8, num_experts=4))
    x = torch.randn(5, 8)
    x[2, 3] = bad
    with pytest.raises(ConfigError, match="NaN") as exc:
        layer(x)
    assert field_of(exc) == "x"


def test_wrong_input_width():
    layer = MoELayer(MoEConfig(dim=8, hidden_dim=8, num_experts=4))
    with pytest.raises(ConfigError, match="dim=8") as exc:
        layer(torch.randn(5, 7))
    assert field_of(exc) == "x"


def test_router_field_errors():
    with pytest.raises(ConfigError) as exc:
        build_router(RouterConfig(name="nosuchrouter"), dim=4, num_experts=2)
    assert field_of(exc) == "router.name"
    with pytest.raises(ConfigError) as exc:
        build_router(RouterConfig(name="expert_choice", capacity_factor=0.0), dim=4, num_experts=2)
    assert field_of(exc) == "router.capacity_factor"
    for kwargs, field in [
        ({"top_k": 0}, "router.top_k"),
        ({"score_func": "relu"}, "router.score_func"),
        ({"jitter": 2.0}, "router.jitter"),
        ({"capacity_factor": float("nan")}, "router.capacity_factor"),
        ({"drop_priority": "random"}, "router.drop_priority"),
    ]:
        with pytest.raises(ConfigError) as exc:
            RouterConfig(**kwargs)
        assert field_of(exc) == field


def test_from_dict_validates_nested_router():
    cfg = from_dict(MoEConfig, {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": {"top_k": 1}})
    assert cfg.router.top_k == 1
    with pytest.raises(ConfigError) as exc:
        from_dict(MoEConfig, {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": {"top_k": 9}})
    assert field_of(exc) == "router.top_k"
    with pytest.raises(ConfigError) as exc:
        from_dict(MoEConfig, {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": {"topk": 1}})
    assert field_of(exc) == "router.topk"
