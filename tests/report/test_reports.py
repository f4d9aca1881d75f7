"""Direct tests of the report layer: tables say what the summaries hold; plots are written as PNGs."""

import numpy as np
import pytest

from edgemoe.edge import load_scenario
from edgemoe.edge.simulator import PolicySpec, simulate, summarize
from edgemoe.report import collab as report_collab
from edgemoe.report import network, train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_sim():
    spec = load_scenario("paper", {"arrivals": {"rate": 60.0}})
    policies = [PolicySpec(n, n) for n in ("stable-moe", "topk", "jsq-k")]
    runs = simulate(spec, policies, 20, seed=0)
    return spec, runs, summarize([runs], spec, policies)


def test_network_table_has_one_row_per_policy_and_the_headline(small_sim):
    _, _, summary = small_sim
    lines = network.format_table(summary).splitlines()
    assert lines[0].startswith("policy") and set(lines[1]) == {"-"}
    assert [line.split()[0] for line in lines[2:5]] == ["stable-moe", "topk", "jsq-k"]
    topk = summary["topk"]["throughput_mean"]
    assert lines[3].split()[2] == f"{1.0:.2f}"  # topk is its own best gate-following baseline
    assert float(lines[2].split()[2]) == pytest.approx(
        summary["stable-moe"]["throughput_mean"] / topk, abs=0.006
    )
    ratio = summary["stable_moe_throughput_ratio"]
    assert f"stable_moe_throughput_ratio: {ratio:.3f} (stable-moe vs topk)" in lines


def test_network_plots_are_pngs(small_sim, tmp_path):
    spec, runs, summary = small_sim
    paths = network.plot_runs(runs, spec, summary, tmp_path)
    assert {p.name for p in paths} == {
        "backlog.png",
        "throughput.png",
        "gating_consistency.png",
        "energy.png",
        "pareto.png",
    }
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    sweep = {
        "param": "V",
        "policy": "stable-moe",
        "points": [
            {"value": v, "utility_mean": u, "gc_norm_mean": 0.5, "backlog_mean": b}
            for v, u, b in ((1.0, 10.0, 5.0), (10.0, 12.0, 50.0))
        ],
    }
    assert all(p.read_bytes().startswith(PNG) for p in network.plot_sweep(sweep, summary, tmp_path))


def test_moving_average_closed_form():
    np.testing.assert_allclose(network.moving_average(np.arange(6.0), 3), [1, 2, 3, 4])
    np.testing.assert_allclose(network.moving_average(np.arange(3.0), 10), [1.0])


def test_train_tables_show_spread_and_markdown():
    summaries = {
        "stable-moe": {
            "throughput_mean": 10.0,
            "completed_mean": 9.0,
            "test_accuracy": 0.5,
            "backlog_mean": 3.0,
            "energy_over_budget_max": 0.9,
            "gc_norm_mean": 0.8,
        }
    }
    text = train.format_table(summaries, {"stable-moe": {"throughput_mean": 1.5}})
    assert "10.0 ± 1.5" in text and "0.500" in text
    md = train.markdown_table(summaries).splitlines()
    assert md[0].startswith("| policy |") and md[2].startswith("| stable-moe | 10.0 |")


def test_collab_plots(tmp_path):
    rows = [
        {
            "sweep": s,
            "method": m,
            "feasible": True,
            x: b,
            "select_accuracy": 0.5 + b / 10,
            "test_accuracy": 0.4,
        }
        for s, x in (("energy", "energy_budget_j"), ("latency", "latency_budget_s"))
        for m in ("dmo", "greedy")
        for b in (1.0, 2.0)
    ]
    paths = report_collab.plot_sweep(rows, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_energy.png", "accuracy_vs_latency.png"]
    gap = {
        "rows": [
            {"size": 2, "ce_retrained": 1.0, "ce_restricted": 1.1},
            {"size": 3, "ce_retrained": 0.9, "ce_restricted": 0.9},
        ]
    }
    assert report_collab.plot_gap(gap, tmp_path).read_bytes().startswith(PNG)
    results = [
        {"n": n, "exhaustive_evals": 2**n, "dmo_evals": n * n, "exhaustive_seconds": 1.0, "dmo_seconds": 0.1}
        for n in (4, 8)
    ]
    assert report_collab.plot_dmo(results, tmp_path / "dmo.png").read_bytes().startswith(PNG)
