"""The simulation experiment layer: validation before any file, chunk sizing, run folders."""

import json

import pytest

from edgemoe.cli import main
from edgemoe.edge import load_scenario
from edgemoe.errors import ConfigError
from edgemoe.experiments.simulate import (
    DEFAULT_CHUNK,
    TraceTable,
    chunk_bytes,
    plan_simulation,
    run_simulation,
    size_chunk,
)
from edgemoe.runs import RunFolder, run_path


def test_chunk_memory_is_chunk_times_tokens_times_experts_times_8_bytes():
    # The figure from the issue: today's default chunk at E=256, N=16k holds about 8 GB.
    assert chunk_bytes(250, 16_384, 256) == 250 * 16_384 * 256 * 8 == 8_388_608_000


def test_chunk_is_sized_to_the_memory_budget():
    assert size_chunk(None, 400, 8, 512) == (DEFAULT_CHUNK, None)  # small networks keep the default
    chunk, note = size_chunk(None, 16_384, 256, 512)
    assert chunk == 512 * 2**20 // (16_384 * 256 * 8) == 16 and note is None
    chunk, note = size_chunk(None, 16_384, 256, 1)  # not even one slot fits: one slot, with a warning
    assert chunk == 1 and "one slot" in note
    chunk, note = size_chunk(250, 16_384, 256, 512)  # explicit chunks are kept, with a warning
    assert chunk == 250 and "--chunk 250" in note and "8000 MB" in note


def test_plan_sizes_the_chunk_of_a_large_network():
    spec = load_scenario("large", {"arrivals": {"rate": 16_384.0}})
    plan = plan_simulation(spec, slots=10, seeds=1, policies="topk", memory_mb=64)
    assert plan.chunk == 64 * 2**20 // (16_384 * 64 * 8) and not plan.notes


def test_bad_sweep_value_fails_before_any_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--sweep", "V=-1,1", "--slots", "5", "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "controller.V" in err and "stable-moe[V=-1]" in err
    with pytest.raises(ConfigError, match=r"^--chunk"):
        plan_simulation(load_scenario("paper"), slots=5, seeds=1, chunk=0)


def test_missing_score_recording_fails_before_any_file(tmp_path, capsys):
    spec = tmp_path / "net.yaml"
    spec.write_text(
        "servers: [{f_max: 1.0e+9, cycles_per_token: 1.0e+7, kappa: 1.0e-28, energy_budget: 0.5}]\n"
        "k: 1\nscores: {kind: replay, trace: absent.npz}\n"
    )
    out = tmp_path / "run"
    assert main(["simulate", "--spec", str(spec), "--slots", "5", "--out", str(out)]) == 2
    assert not out.exists()
    assert "absent.npz: score trace" in capsys.readouterr().err


def test_run_folder_appears_with_its_first_file(tmp_path):
    folder = RunFolder(tmp_path / "r")
    assert not folder.path.exists()
    folder.json("summary.json", {"a": 1})
    folder.csv("traces/t.csv", [[1, 2]], header=["x", "y"])
    assert json.loads((folder / "summary.json").read_text()) == {"a": 1}
    assert (folder / "traces" / "t.csv").read_text() == "x,y\n1,2\n"
    assert run_path(None, tmp_path, "sim").name.startswith("sim-")
    assert run_path(tmp_path / "given", "runs", "sim") == tmp_path / "given"


def test_run_simulation_writes_traces_with_one_column_per_server(tmp_path):
    spec = load_scenario("paper", {"arrivals": {"rate": 50.0}})
    plan = plan_simulation(spec, slots=6, seeds=1, policies="topk,jsq-k", chunk=4)
    summary = run_simulation(plan, RunFolder(tmp_path), plots=False, progress=False)
    assert summary["run"]["chunk"] == 4 and set(summary["run"]["policies"]) == {"topk", "jsq-k"}
    lines = (tmp_path / "traces" / "topk_seed0.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:3] == ["slot", "tokens", "served"]
    assert header[-9:] == ["backlog_7"] + [f"freq_ghz_{e}" for e in range(8)]
    assert len(lines) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml", "summary.json", "traces"]


def test_trace_table_columns_match_rows():
    from edgemoe.edge.simulator import PolicySpec, simulate

    spec = load_scenario("homogeneous")
    run = simulate(spec, [PolicySpec("topk", "topk")], 3, seed=0)["topk"]
    table = TraceTable.of(run)
    rows = table.rows()
    assert len(rows) == 3 and all(len(r) == len(table.header()) for r in rows)
    assert rows[2][table.header().index("backlog_0")] == pytest.approx(run["backlog"][2, 0], abs=1e-6)
