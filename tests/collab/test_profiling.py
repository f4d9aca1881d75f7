"""``collab profile``: measured rates against an expert whose timing is known in closed form."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from edgemoe.cli.collab_llm import register_collab
from edgemoe.collab.backends import OpenAIConfig, build_backend
from edgemoe.collab.costs import request_costs
from edgemoe.collab.profiles import ExpertProfile, RequestModel, load_collab_config
from edgemoe.collab.profiling import profile_backend
from edgemoe.testing import TinyOpenAIServer

PROMPT_TOKEN_S = 2e-4  # 5,000 prompt tokens/s
OUTPUT_TOKEN_S = 1e-2  # 100 output tokens/s


@pytest.fixture(scope="module")
def server():
    with TinyOpenAIServer(6, prompt_token_s=PROMPT_TOKEN_S, output_token_s=OUTPUT_TOKEN_S) as srv:
        yield srv


def test_profile_recovers_the_prefill_and_decode_rates(server):
    profile = ExpertProfile("edge", hardware="jetson-orin-nano")
    backend = build_backend("edge", OpenAIConfig(url=server.url))
    try:
        result = profile_backend(backend, profile, prompt_chars=1024, decode_tokens=24, repeats=2)
    finally:
        backend.close()
    assert result.prefill_tokens_per_s == pytest.approx(1 / PROMPT_TOKEN_S, rel=0.25)
    assert result.decode_tokens_per_s == pytest.approx(1 / OUTPUT_TOKEN_S, rel=0.25)
    assert result.decode_tokens == 23 and result.load_s >= 0
    # Energy is the model power x busy time: per token, the preset power over the rate.
    assert result.power_w == profile.power == 12.0
    assert result.energy_per_output_token_j == pytest.approx(profile.power / result.decode_tokens_per_s)


def test_profile_command_writes_a_profile_the_core_accepts(server, tmp_path):
    experts = {
        "experts": [
            {"name": "edge", "hardware": "jetson-agx-orin", "backend": {"kind": "openai", "url": server.url}}
        ],
        "budgets": {"default_latency_s": 2.0},
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(experts))
    parser = argparse.ArgumentParser()
    register_collab(parser.add_subparsers())
    out = tmp_path / "run"
    argv = ["profile", "--experts", str(path), "--out", str(out), "--decode-tokens", "16", "--repeats", "2"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    for name in ("summary.json", "profile.csv", "profile.png", "experts.profiled.yaml"):
        assert (out / name).is_file()
    profiled = load_collab_config(out / "experts.profiled.yaml")
    expert = profiled.experts[0]
    assert expert.latency_per_prompt_token_s == pytest.approx(PROMPT_TOKEN_S, rel=0.3)
    assert expert.latency_per_output_token_s == pytest.approx(OUTPUT_TOKEN_S, rel=0.3)
    assert profiled.budgets.default_latency_s == 2.0  # the rest of the file is kept
    # The core's delay model now predicts this expert's compute time from the measurements.
    costs = request_costs(profiled.experts, [1000], RequestModel(output_tokens=10))
    compute = 1000 * expert.latency_per_prompt_token_s + 10 * expert.latency_per_output_token_s
    assert costs.energy_QN[0, 0] == pytest.approx(expert.power * compute)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == {} and "not a measurement" in summary["energy_model"]
