from dataclasses import dataclass, field

import pytest

from edgemoe.config import ConfigError, apply_overrides, check_positive, from_dict


@dataclass
class Inner:
    rate: float = 1.0

    def __post_init__(self):
        check_positive(self.rate, "rate")


@dataclass
class Outer:
    name: str
    k: int = 2
    inner: Inner = field(default_factory=Inner)
    xs: list[float] = field(default_factory=list)


def test_from_dict_builds_nested():
    cfg = from_dict(Outer, {"name": "a", "k": 3, "inner": {"rate": 2}, "xs": [1, 2]})
    assert cfg.inner.rate == 2.0 and cfg.xs == [1.0, 2.0] and cfg.k == 3


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^inner\.rate: must be a finite number > 0"):
        from_dict(Outer, {"name": "a", "inner": {"rate": -1}})
    with pytest.raises(ConfigError, match=r"^bogus: unknown field"):
        from_dict(Outer, {"name": "a", "bogus": 1})
    with pytest.raises(ConfigError, match=r"^k: must be an integer"):
        from_dict(Outer, {"name": "a", "k": "two"})
    with pytest.raises(ConfigError, match=r"^name: is required"):
        from_dict(Outer, {})


def test_overrides():
    assert apply_overrides({"a": {"b": 1}}, ["a.b=3", "c=[1, 2]"]) == {"a": {"b": 3}, "c": [1, 2]}
