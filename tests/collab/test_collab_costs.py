"""Delay and energy closed forms."""

import numpy as np
import pytest

from edgemoe.collab.costs import eligible_QN, request_costs
from edgemoe.collab.profiles import ExpertProfile, RequestModel


def test_delay_and_energy_closed_forms():
    experts = [
        ExpertProfile(
            name="a",
            hardware="custom",
            power_w=10.0,
            prefill_tokens_per_s=100.0,
            decode_tokens_per_s=10.0,
            link_mbps=8.0,
            link_rtt_s=0.01,
            fixed_latency_s=0.05,
            tx_power_w=2.0,
        ),
        ExpertProfile(
            name="b",
            hardware="custom",
            power_w=50.0,
            latency_per_prompt_token_s=0.001,
            latency_per_output_token_s=0.02,
            link_mbps=80.0,
            link_rtt_s=0.0,
        ),
    ]
    req = RequestModel(output_tokens=3, bytes_per_token=4.0, response_bytes=100.0, aggregation_s=0.1)
    costs = request_costs(experts, np.array([50, 200]), req)
    for q, tokens in enumerate([50, 200]):
        bits = 8 * (tokens * 4 + 100)
        tx_a, tx_b = 0.02 + bits / 8e6, bits / 80e6
        comp_a, comp_b = 0.05 + tokens / 100 + 3 / 10, tokens * 0.001 + 3 * 0.02
        assert costs.delay_QN[q] == pytest.approx([tx_a + comp_a, tx_b + comp_b])
        assert costs.energy_QN[q] == pytest.approx([10 * comp_a + 2 * tx_a, 50 * comp_b])
    both = np.ones((2, 2), dtype=bool)
    assert costs.set_delay(both) == pytest.approx(costs.delay_QN.max(axis=1) + 0.1)
    assert costs.set_energy(both) == pytest.approx(costs.energy_QN.sum(axis=1))
    only_b = np.array([[False, True], [False, True]])
    assert costs.set_delay(only_b) == pytest.approx(costs.delay_QN[:, 1] + 0.1)
    assert costs.set_delay(np.zeros((2, 2), dtype=bool)).tolist() == [0.0, 0.0]
    budget = costs.delay_QN[:, 1] + 0.1
    assert eligible_QN(costs, budget)[:, 1].all()
