"""Bad configuration raises ConfigError naming the field; bad activations raise InputError."""

import pytest
import torch

from edgemoe.config import ConfigError, from_dict, to_dict
from edgemoe.errors import InputError
from edgemoe.moe import MoEConfig, MoELayer, RouterConfig, TopKRouterConfig


def field_of(excinfo):
    return excinfo.value.field


def test_top_k_larger_than_num_experts():
    with pytest.raises(ConfigError, match="num_experts") as exc:
        MoEConfig(dim=8, hidden_dim=8, num_experts=2, router=RouterConfig(top_k=3))
    assert field_of(exc) == "router.top_k"
    with pytest.raises(ConfigError) as exc:
        TopKRouterConfig(top_k=5).build(dim=4, num_experts=4)
    assert field_of(exc) == "router.top_k"


@pytest.mark.parametrize("field", ["dim", "hidden_dim", "num_experts"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(field, value):
    kwargs = {"dim": 8, "hidden_dim": 8, "num_experts": 4, field: value}
    with pytest.raises(ConfigError, match="positive") as exc:
        MoEConfig(**kwargs)
    assert field_of(exc) == field


def test_unknown_executor_names_choices():
    with pytest.raises(ConfigError, match=r"\['auto', 'loop', 'padded', 'sorted'\]") as exc:
        MoEConfig(dim=8, hidden_dim=8, num_experts=4, executor="magic")
    assert field_of(exc) == "executor"


@pytest.mark.parametrize("router", ["topk", "etr"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_input_error_when_checked(router, score_func, bad):
    cfg = RouterConfig(name=router, score_func=score_func, top_k=1)
    layer = MoEConfig(dim=8, hidden_dim=8, num_experts=4, router=cfg, check_finite=True).build()
    x = torch.randn(5, 8)
    x[2, 3] = bad
    with pytest.raises(InputError, match="NaN") as exc:
        layer(x)
    assert exc.value.what == "x" and not isinstance(exc.value, ConfigError)
    # Off by default: no host sync, the NaN/Inf propagates to the output instead.
    unchecked = MoEConfig(dim=8, hidden_dim=8, num_experts=4, router=cfg).build()
    out, _ = unchecked(x)
    assert not out.isfinite().all()


def test_wrong_input_is_an_input_error():
    layer = MoELayer(MoEConfig(dim=8, hidden_dim=8, num_experts=4))
    with pytest.raises(InputError, match="dim=8") as exc:
        layer(torch.randn(5, 7))
    assert exc.value.what == "x"
    for ids in (
        torch.tensor([[0, 4]] * 3),
        torch.tensor([[0, -2]] * 3),
        torch.tensor([[0, 1]] * 2),
        torch.ones(3, 2),
    ):
        with pytest.raises(InputError, match="expert_ids_TK") as exc:
            layer(torch.randn(3, 8), expert_ids_TK=ids)
        assert exc.value.what == "expert_ids_TK" and not isinstance(exc.value, ConfigError)


def test_router_field_errors():
    with pytest.raises(ConfigError, match=r"choose one of \['etr', 'expert_choice', 'topk'\]") as exc:
        RouterConfig(name="nosuchrouter").build(dim=4, num_experts=2)
    assert field_of(exc) == "router.name"
    with pytest.raises(ConfigError) as exc:
        RouterConfig(name="expert_choice", capacity_factor=0.0).build(dim=4, num_experts=2)
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
    with pytest.raises(ConfigError, match="'etr'") as exc:
        from_dict(MoEConfig, {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": {"name": "eTR"}})
    assert field_of(exc) == "router.name"
    with pytest.raises(ConfigError, match="allowed fields") as exc:
        from_dict(MoEConfig, {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": {"temperature": 1}})
    assert field_of(exc) == "router.temperature"  # an ETR field is not a top-k field


def test_router_config_from_yaml_mapping_is_typed_per_router():
    data = {"name": "etr", "top_k": 1, "temperature": 0.2, "capacity": {"schedule": "annealed"}}
    cfg = from_dict(MoEConfig, {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": data})
    assert type(cfg.router).__name__ == "ETRRouterConfig"
    assert cfg.router.temperature == 0.2 and cfg.router.capacity.schedule == "annealed"
    assert type(cfg.router.build(8, 4)).__name__ == "ETRRouter"
    assert from_dict(MoEConfig, to_dict(cfg)) == cfg  # a saved config loads back as the same types
    # A plain RouterConfig resolves to the named router's typed config on construction.
    plain = MoEConfig(
        dim=8, hidden_dim=16, num_experts=4, router=RouterConfig(name="expert_choice", capacity_factor=1)
    )
    assert type(plain.router).__name__ == "ExpertChoiceRouterConfig"
    with pytest.raises(ConfigError) as exc:
        MoEConfig(dim=8, hidden_dim=16, num_experts=4, router={"name": "topk", "top_k": 0})
    assert field_of(exc) == "router.top_k"
