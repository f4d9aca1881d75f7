"""Simulator: common random numbers, FIFO completion accounting, summary metrics, and the CLI."""

import json

import numpy as np
import pytest
import yaml

from edgemoe.cli import main
from edgemoe.edge import ALL_POLICIES, Workload, load_scenario, save_score_trace
from edgemoe.edge.simulator import CompletionTracker, PolicySpec, simulate, slope, summarize

SUMMARY_KEYS = {
    "throughput_mean",
    "completed_mean",
    "backlog_mean",
    "backlog_slope_last_half",
    "energy_over_budget_max",
    "gc_norm_mean",
}


def completions_by_loop(assignments, served_TE):
    """Per-token FIFO bookkeeping, one token at a time."""
    J = served_TE.shape[1]
    cum = np.cumsum(served_TE, axis=0)
    count = np.zeros(J, dtype=int)
    done = np.zeros(len(served_TE), dtype=int)
    for ids, kept in assignments:
        last = -1
        for j, keep in zip(ids, kept):
            if not keep:
                continue
            t = int(np.searchsorted(cum[:, j], count[j] + 1 - 1e-9))
            count[j] += 1
            last = max(last, t)
        if 0 <= last < len(served_TE):  # a token with every assignment dropped never completes
            done[last] += 1
    return done


def test_completion_tracker_matches_token_loop():
    rng = np.random.default_rng(0)
    J, T, K = 4, 30, 2
    served = rng.uniform(0, 3, (T, J))
    tracker = CompletionTracker(J, T)
    tracker.cum_served_ET[:] = np.cumsum(served, axis=0).T
    assignments = []
    for t0 in range(0, T, 10):  # chunks of 10 slots, two tokens per slot
        ids = np.array([rng.choice(J, K, replace=False) for _ in range(20)])
        kept = rng.random((20, K)) < 0.8
        kept[0] = True
        tracker.add(ids, kept, t0 + 10)
        assignments += list(zip(ids, kept))
    tracker.finish(T)
    np.testing.assert_array_equal(tracker.completed_T, completions_by_loop(assignments, served))


def test_common_random_numbers_and_determinism():
    spec = load_scenario("paper")
    policies = [PolicySpec(n, n) for n in ("stable-moe", "topk-max", "random-k")]
    a = simulate(spec, policies, 60, seed=4, chunk=25)
    b = simulate(spec, policies, 60, seed=4, chunk=60)
    for lab in a:
        np.testing.assert_array_equal(a[lab]["tokens"], a["stable-moe"]["tokens"])
        np.testing.assert_array_equal(a[lab]["topk_mass"], a["stable-moe"]["topk_mass"])
        for key in ("backlog", "served", "completed", "gate_mass"):
            np.testing.assert_allclose(a[lab][key], b[lab][key])


def test_conservation_and_headline_on_short_paper_run():
    spec = load_scenario("paper")
    names = ("stable-moe", "topk-max", "topk-capacity", "jsq-k", "random-k")
    policies = [PolicySpec(n, n) for n in names]
    runs = simulate(spec, policies, 400, seed=0)
    for r in runs.values():
        assert (r["backlog"] >= 0).all()
        # Every kept assignment is either served or still queued.
        kept = r["arrived"].sum()
        np.testing.assert_allclose(r["served"].sum() + r["backlog"][-1].sum(), kept, rtol=1e-9)
        np.testing.assert_allclose(r["arrived"].sum() + r["drops"].sum(), r["tokens"].sum() * spec.k)
        assert r["completed"].sum() <= r["tokens"].sum()
    summary = summarize([runs], spec, policies)
    for lab in names:
        assert SUMMARY_KEYS <= set(summary[lab])
    assert summary["best_gate_following_baseline"] in ("topk-max", "topk-capacity")
    assert summary["stable_moe_throughput_ratio"] > 1.3
    assert summary["stable_moe_gc_gain"] > 0.25
    assert summary["topk-max"]["backlog_slope_last_half"] > 100  # popular slow servers overflow
    assert summary["stable-moe"]["stable"] and not summary["topk-max"]["stable"]
    assert summary["stable-moe"]["energy_over_budget_max"] < 1.02
    assert summary["topk-max"]["gc_norm_mean"] == pytest.approx(1.0)


def test_slope():
    assert slope(3.0 * np.arange(10) + 1) == pytest.approx(3.0)


def test_cli_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "simulate",
            "--scenario",
            "paper",
            "--slots",
            "80",
            "--seeds",
            "2",
            "--policies",
            "all",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary["stable-moe-sequential"])
    for key in (
        "stable_moe_throughput_ratio",
        "stable_moe_gc_gain",
        "best_gate_following_baseline",
        "best_load_only_baseline",
    ):
        assert key in summary
    for name in (
        "backlog.png",
        "throughput.png",
        "energy.png",
        "gating_consistency.png",
        "pareto.png",
        "spec.yaml",
    ):
        assert (out / name).is_file()
    header = (out / "traces" / "jsq-k_seed1.csv").read_text().splitlines()[0]
    assert header.startswith("slot,tokens,served,completed,backlog")
    assert "stable_moe_throughput_ratio" in capsys.readouterr().out


def test_cli_sweep_and_errors(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(
        [
            "simulate",
            "--scenario",
            "paper",
            "--slots",
            "60",
            "--seeds",
            "1",
            "--sweep",
            "V=1,100",
            "--out",
            str(out),
            "--set",
            "arrivals.rate=200",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["value"] for p in summary["sweep"]["points"]] == [1.0, 100.0]
    assert (out / "sweep_backlog.png").is_file()
    assert main(["simulate", "--policies", "bogus", "--slots", "5", "--out", str(tmp_path / "x")]) == 2
    assert main(["simulate", "--sweep", "W=1", "--slots", "5", "--out", str(tmp_path / "y")]) == 2
    assert main(["simulate", "--set", "k=20", "--slots", "5", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "--policies" in err and "--sweep" in err and "k:" in err


def test_cli_replays_recorded_scores_from_a_spec_file(tmp_path):
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 30, size=12)
    scores = rng.dirichlet(np.ones(8) * 0.3, size=int(counts.sum())).astype(np.float32)
    save_score_trace(tmp_path / "scores.npz", scores, np.concatenate([[0], np.cumsum(counts)]))
    spec = load_scenario("paper").to_dict()
    spec["scores"] = {"kind": "replay", "trace": "scores.npz"}  # relative to the YAML file
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    rc = main(
        [
            "simulate",
            "--spec",
            str(tmp_path / "net.yaml"),
            "--slots",
            "30",
            "--seeds",
            "1",
            "--policies",
            "stable-moe,topk",
            "--out",
            str(out),
            "--no-plots",
        ]
    )
    assert rc == 0
    rows = (out / "traces" / "topk_seed0.csv").read_text().splitlines()[1:]
    tokens = [float(r.split(",")[1]) for r in rows]
    assert tokens == [float(c) for c in np.resize(counts, 30)]  # the recording, cycled


def test_workload_resumes_exactly():
    spec = load_scenario("bursty")
    w = Workload(spec, seed=7)
    w.next_chunk(13)
    state = w.state_dict()
    ahead = w.next_chunk(9)
    w2 = Workload(spec, seed=0)
    w2.load_state_dict(state)
    again = w2.next_chunk(9)
    np.testing.assert_array_equal(again.offsets, ahead.offsets)
    np.testing.assert_array_equal(again.scores, ahead.scores)


@pytest.mark.parametrize("scenario", ["large", "bursty", "homogeneous"])
def test_every_policy_runs_on_every_scenario(scenario):
    spec = load_scenario(scenario)
    policies = [PolicySpec(n, n) for n in ALL_POLICIES]
    runs = simulate(spec, policies, 4, seed=1)
    for r in runs.values():
        assert r["backlog"].shape == (4, spec.num_servers)
        np.testing.assert_allclose(r["served"].sum() + r["backlog"][-1].sum(), r["arrived"].sum(), rtol=1e-9)


def test_cli_jobs_do_not_change_results(tmp_path):
    args = ["simulate", "--scenario", "paper", "--slots", "40", "--seeds", "2", "--no-plots"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--jobs", "2"]) == 0
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    a.pop("run"), b.pop("run")
    assert a == b
    assert (tmp_path / "b" / "traces" / "jsq-k_seed1.csv").read_text() == (
        tmp_path / "a" / "traces" / "jsq-k_seed1.csv"
    ).read_text()
