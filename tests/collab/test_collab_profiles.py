"""Profiles: presets, overrides, and errors that name the bad field."""

import pytest

from edgemoe.collab.profiles import HARDWARE_PRESETS, ExpertProfile, load_collab_config
from edgemoe.config import ConfigError


def _cfg(expert=None, **top):
    return {"experts": [{"name": "a", **(expert or {})}], **top}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_cfg({"power_w": -5.0}), "experts[0].power_w"),
        (_cfg({"hardware": "tpu-v9"}), "experts[0].hardware"),
        (_cfg({"link_mbps": 0}), "experts[0].link_mbps"),
        (_cfg({"skill": {"base": 1.5}}), "experts[0].skill.base"),
        (_cfg({"hardware": "custom"}), "experts[0].power_w"),
        (_cfg(budgets={"energy_j": -1.0}), "budgets.energy_j"),
        (_cfg(budgets={"latency_s": {"stem": -0.1}}), "budgets.latency_s.stem"),
        (_cfg(budgets={"latency_s": {"poetry": 1.0}}), "budgets.latency_s.poetry"),
        (_cfg(budgets={"default_latency_s": 0}), "budgets.default_latency_s"),
        (_cfg(top_k=0), "top_k"),
        (_cfg({"colour": "red"}), "experts[0].colour"),
    ],
)
def test_bad_profiles_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        load_collab_config(data)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_duplicate_names_rejected():
    with pytest.raises(ConfigError, match="unique"):
        load_collab_config({"experts": [{"name": "a"}, {"name": "a"}]})


def test_preset_values_scale_with_model_size_and_overrides_win():
    p = HARDWARE_PRESETS["rtx-4090"]
    e = ExpertProfile(name="x", hardware="rtx-4090", params_b=7.0)
    assert e.power == p.power_w
    assert e.seconds_per_prompt_token == pytest.approx(7.0 / p.prefill_tokens_per_s)
    assert e.seconds_per_output_token == pytest.approx(7.0 / p.decode_tokens_per_s)
    o = ExpertProfile(
        name="y",
        hardware="rtx-4090",
        power_w=123.0,
        decode_tokens_per_s=50.0,
        latency_per_prompt_token_s=0.01,
    )
    assert (o.power, o.seconds_per_output_token, o.seconds_per_prompt_token) == (123.0, 1 / 50.0, 0.01)


def test_yaml_file_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "experts:\n  - {name: orin, hardware: jetson-agx-orin, params_b: 3}\n"
        "  - {name: big, hardware: custom, power_w: 200, prefill_tokens_per_s: 1000, decode_tokens_per_s: 20}\n"
        "budgets: {energy_j: 10, latency_s: {stem: 0.5}, default_latency_s: 1.0}\ntop_k: 1\n"
    )
    cfg = load_collab_config(path)
    assert cfg.expert_names == ["orin", "big"]
    assert cfg.budgets.latency_for("stem") == 0.5 and cfg.budgets.latency_for("other") == 1.0
    assert cfg.experts[1].power == 200.0
