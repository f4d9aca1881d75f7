"""Network spec, scenarios, arrivals and score traces: validation, closed-form figures, resume."""

import numpy as np
import pytest
import yaml

from edgemoe.edge import (
    NetworkState,
    ScoreTrace,
    SkewedScoreGenerator,
    Workload,
    load_scenario,
    load_score_trace,
    load_spec,
    make_arrivals,
    make_controller,
    save_score_trace,
    spec_from_dict,
)
from edgemoe.edge.spec import SCENARIOS, ArrivalSpec
from edgemoe.errors import ConfigError, DataError, InputError


def paper_dict(**overrides):
    data = {k: v for k, v in SCENARIOS["paper"].items()}
    data.update(overrides)
    return data


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenarios_load(name):
    spec = load_scenario(name)
    assert spec.num_servers == len(spec.f_max_E) >= spec.k
    assert (spec.f_sustainable_E <= spec.f_max_E).all()


def test_paper_budget_binds_on_fast_servers():
    spec = load_scenario("paper")
    # (E^max / kappa tau)^(1/3) = (0.5 / 1e-28)^(1/3) = 1.70998 GHz; slow servers keep f_max.
    expected = np.minimum(spec.f_max_E, (0.5 / 1e-28) ** (1 / 3))
    np.testing.assert_allclose(spec.f_sustainable_E, expected, rtol=1e-12)
    np.testing.assert_allclose(spec.energy_E(spec.f_sustainable_E)[4:], 0.5, rtol=1e-12)
    assert 1150 < spec.capacity_E(spec.f_sustainable_E).sum() < 1200  # against K * lambda = 800
    assert load_scenario("large").num_servers == 64
    assert load_scenario("bursty").arrivals.mean_rate() == pytest.approx(400.0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"k": 9}, "k"),
        ({"arrivals": {"kind": "poisson", "rate": -1.0}}, "arrivals.rate"),
        ({"tau": 0.0}, "tau"),
        (
            {"servers": [{"f_max": 1e9, "cycles_per_token": 0.0, "kappa": 1e-28, "energy_budget": 0.5}]},
            "servers[0].cycles_per_token",
        ),
        (
            {
                "servers": [
                    {"f_max": 1e9, "cycles_per_token": 1e7, "kappa": 1e-28, "energy_budget": float("nan")}
                ]
            },
            "servers[0].energy_budget",
        ),
        ({"arrivals": {"kind": "mmpp", "rates": [1.0, 2.0], "switch_probs": [0.1]}}, "arrivals.switch_probs"),
        ({"scores": {"temperature": 0}}, "scores.temperature"),
        ({"controller": {"V": -1}}, "controller.V"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_specs_name_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        spec_from_dict(paper_dict(**change))
    assert err.value.field == field


def test_k_larger_than_servers_message():
    with pytest.raises(ConfigError, match=r"^k: .*E=1"):
        spec_from_dict(paper_dict(k=2, servers=SCENARIOS["paper"]["servers"][:1]))


def test_nan_scores_rejected_by_controllers():
    spec = load_scenario("paper")
    scores = np.full((3, 8), 0.125)
    scores[1, 2] = np.nan
    with pytest.raises(InputError, match=r"^scores_NE: .*row 1"):
        make_controller("stable-moe", spec).decide(NetworkState.initial(spec), scores)
    with pytest.raises(InputError, match=r"^scores_NE: must have shape"):
        make_controller("topk", spec).decide(NetworkState.initial(spec), np.ones((3, 7)))


def test_unknown_controller_parameter_named():
    spec = load_scenario("paper")
    with pytest.raises(ConfigError, match=r"^controller.Vee"):
        make_controller("stable-moe", spec, Vee=1.0)
    with pytest.raises(ConfigError, match=r"^controller.omega2"):
        make_controller("stable-moe", spec, omega2=-1.0)


def test_yaml_spec_with_csv_trace(tmp_path):
    (tmp_path / "counts.csv").write_text("slot,tokens\n0,5\n1,7\n2,0\n")
    data = paper_dict(arrivals={"kind": "trace", "trace": "counts.csv"})
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "net.yaml")
    arrivals = make_arrivals(spec.arrivals, seed=0)
    np.testing.assert_array_equal(arrivals.sample(7), [5, 7, 0, 5, 7, 0, 5])
    bad = paper_dict(arrivals={"kind": "trace", "trace": "missing.csv"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(DataError, match=r"missing\.csv: arrival trace \(arrivals.trace\) does not exist"):
        make_arrivals(load_spec(tmp_path / "bad.yaml").arrivals)


@pytest.mark.parametrize(
    ("kind", "rates", "probs"),
    [
        ("poisson", [], []),
        ("mmpp", [20.0, 80.0], [0.05, 0.1]),
        ("mmpp", [10.0, 40.0, 90.0], [0.2, 0.1, 0.05]),
    ],
)
def test_arrivals_mean_and_exact_resume(kind, rates, probs):
    spec = ArrivalSpec(kind=kind, rate=50.0, rates=rates, switch_probs=probs)
    proc = make_arrivals(spec, seed=3)
    counts = proc.sample(20000)
    assert counts.mean() == pytest.approx(spec.mean_rate(), rel=0.05)
    state = proc.state_dict()
    ahead = proc.sample(500)
    proc2 = make_arrivals(spec, seed=99)
    proc2.load_state_dict(state)
    np.testing.assert_array_equal(proc2.sample(500), ahead)


def test_score_trace_roundtrip_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(8), size=10).astype(np.float32)
    offsets = np.array([0, 3, 3, 10])
    labels = np.arange(10)
    save_score_trace(tmp_path / "s.npz", scores, offsets, labels)
    trace = load_score_trace(tmp_path / "s.npz")
    np.testing.assert_array_equal(trace.scores, scores)
    np.testing.assert_array_equal(trace.counts, [3, 0, 7])
    np.testing.assert_array_equal(trace.slot_labels(2), labels[3:])
    with pytest.raises(InputError, match="^offsets"):
        ScoreTrace(scores, np.array([0, 3, 9]))
    with pytest.raises(InputError, match="^labels"):
        ScoreTrace(scores, offsets, labels[:4])
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="^scores"):
        save_score_trace(tmp_path / "bad.npz", bad, offsets)
    assert not (tmp_path / "bad.npz").exists()
    with pytest.raises(DataError, match="score trace"):
        load_score_trace(tmp_path / "absent.npz")


def test_replay_workload_cycles_recording(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.dirichlet(np.ones(8), size=9).astype(np.float32)
    save_score_trace(tmp_path / "s.npz", scores, np.array([0, 4, 9]))
    spec = load_scenario("paper", {"scores": {"kind": "replay", "trace": str(tmp_path / "s.npz")}})
    chunk = Workload(spec, seed=0).next_chunk(3)
    np.testing.assert_array_equal(chunk.counts, [4, 5, 4])
    np.testing.assert_array_equal(chunk.slot(2), scores[:4])
    wrong = load_scenario(
        "homogeneous", {"scores": {"kind": "replay", "trace": str(tmp_path / "s.npz")}, "k": 1}
    )
    wrong = spec_from_dict({**wrong.to_dict(), "servers": wrong.to_dict()["servers"][:4]})
    with pytest.raises(ConfigError, match="^scores.trace"):
        Workload(wrong, seed=0)


def test_skewed_gate_prefers_slow_servers():
    spec = load_scenario("paper")
    gen = SkewedScoreGenerator(spec.scores, spec.f_max_E)
    scores, labels = gen.sample(20000, np.random.default_rng(0))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    top = np.argsort(scores, axis=1)[:, -spec.k :]
    load = np.bincount(top.ravel(), minlength=8) / len(scores)
    assert load[:2].mean() > 2 * load[6:].mean()  # popular experts sit on the 1 GHz servers
    # Class structure matters: the top expert distribution differs between classes.
    first = top[:, -1]
    per_class = [np.bincount(first[labels == c], minlength=8) for c in range(3)]
    assert not all(np.argmax(p) == np.argmax(per_class[0]) for p in per_class)
