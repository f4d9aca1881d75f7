"""The one registry mechanism: duplicates refused, unknown names listed with the user's field, plug-ins
named before their module is imported."""

import pytest

from edgemoe.errors import ConfigError
from edgemoe.registry import Registry


def test_register_get_and_duplicates():
    reg: Registry[type] = Registry("widget")

    @reg.register("a")
    class A:
        pass

    reg.register("a")(A)  # the same object again is fine (module re-imported)
    assert reg.get("a", field="widget.name") is A and "a" in reg and list(reg) == ["a"]
    with pytest.raises(ValueError, match="already registered"):

        @reg.register("a")
        class B:
            pass


def test_unknown_name_lists_every_choice_and_the_field():
    reg: Registry[type] = Registry("transport", plugin_package="edgemoe.train", plugins=("dist",))
    reg.add("inproc", object)
    with pytest.raises(ConfigError) as info:
        reg.get("grpc", field="transport.kind")
    assert info.value.field == "transport.kind"
    assert "'dist'" in str(info.value) and "'inproc'" in str(info.value)


def test_plugin_module_registers_itself_on_first_use():
    from edgemoe.moe.config import ROUTERS

    assert "etr" in ROUTERS.names()
    assert ROUTERS.get("etr", field="model.router").__name__.startswith("ETR")


def test_plugins_need_a_package():
    with pytest.raises(ValueError):
        Registry("x", plugins=("y",))
