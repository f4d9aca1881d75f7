"""A non-MMLU benchmark end to end: fit from a RouterDC-style file with custom categories and
five-option questions, then select / sweep / compare / eval / policy reload the run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from edgemoe.cli import main
from edgemoe.collab.offline.runs import load_policy, load_run

MODELS = ["alpha", "beta", "gamma"]


def write_benchmark(path, num=160, seed=0):
    """Questions on two topics; alpha is good at 'math', beta at 'history', gamma is mediocre."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        topic = "math" if i % 2 else "history"
        words = " ".join(
            rng.choice(["sum", "angle", "prime"] if topic == "math" else ["king", "war", "empire"], 5)
        )
        skill = {
            "alpha": 0.85 if topic == "math" else 0.3,
            "beta": 0.3 if topic == "math" else 0.85,
            "gamma": 0.55,
        }
        scores = {m: float(rng.random() < p) for m, p in skill.items()}
        opts = "\n".join(f"{L}. option {L}" for L in "ABCDE")
        rows.append(
            {"question": f"[{topic}] {i} {words}\n{opts}\nAnswer:", "scores": scores, "category": topic}
        )
    path.write_text(json.dumps(rows))
    return path


def config(tmp_path, **extra):
    cfg = {
        "data": {
            "source": "table",
            "format": "routerdc",
            "path": str(write_benchmark(tmp_path / "bench.json")),
        },
        "embedder": "hashing",
        "gate": {"steps": 150, "hidden": 16},
        "experts": [
            {"name": "alpha", "hardware": "jetson-agx-orin", "params_b": 7},
            {"name": "beta", "hardware": "rtx-4090", "params_b": 7},
            {"name": "gamma", "hardware": "jetson-orin-nano", "params_b": 1},
        ],
        "request": {"output_tokens_by_category": {"math": 50}},
        "top_k": 1,
        "energy": "routed",
        **extra,
    }
    path = tmp_path / "collab.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_non_mmlu_run_round_trips_through_every_command(tmp_path):
    run = tmp_path / "run"
    assert main(["collab", "fit", "--config", str(config(tmp_path)), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["categories"] == ["history", "math"]
    assert "correctness-only" in summary["objective"]
    for cat in summary["gate_calibration"].values():  # the fallback never loses on validation
        assert cat["chosen_accuracy"] >= cat["equal_weights_accuracy"] - 1e-6

    ws, _ = load_run(run)
    assert ws.correctness_only and ws.config.categories == ["history", "math"]
    assert {len(c) for c in ws.questions.choices} == {5}
    math = ws.questions.category_Q == 1
    assert np.all(ws.output_tokens_Q[math] == 50) and np.all(ws.output_tokens_Q[~math] == 1)
    # Real prompt lengths: longer prompts cost more.
    assert ws.prompt_tokens_Q.min() < ws.prompt_tokens_Q.max() or len(set(ws.questions.prompts())) == 1

    assert (
        main(
            ["collab", "select", "--run", str(run), "--energy-fraction", "0.6", "--out", str(tmp_path / "s")]
        )
        == 0
    )
    sel = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert sel["feasible"] and sel["energy_j"] <= sel["energy_budget_j"] * (1 + 1e-9)
    sweep = ["collab", "sweep", "--run", str(run), "--energy-fractions", "0.3,0.6,1.0"]
    assert main([*sweep, "--latency-budgets", "1,100", "--out", str(tmp_path / "w")]) == 0
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["dmo_equals_exhaustive"] is True
    assert (
        main(["collab", "compare", "--run", str(run), "--at-best-single", "--out", str(tmp_path / "c")]) == 0
    )
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]
    assert {"oracle (per question)", "MoE² (DMO)", "equal weights on the DMO set"} <= {
        r["method"] for r in rows
    }
    assert main(["collab", "eval", "--run", str(run), "--gap-steps", "10", "--out", str(tmp_path / "e")]) == 0

    stream = [
        "collab",
        "stream",
        "--run",
        str(run),
        "--energy-fraction",
        "0.6",
        "--select-categories",
        "history",
    ]
    assert (
        main(
            [*stream, "--serve-categories", "math,history", "--order", "blocks", "--out", str(tmp_path / "t")]
        )
        == 0
    )
    shift = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert shift["stream_requests"] == int((ws.split_Q == 2).sum())
    assert shift["with_queue"]["energy_j"] <= shift["without_queue"]["energy_j"] + 1e-9
    assert (tmp_path / "t" / "energy_stream.png").is_file() and (tmp_path / "t" / "trace.csv").is_file()

    policy = load_policy(run, energy_budget_j=1.0)
    route = policy.route("[math] prime sum angle\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5\nAnswer:", "math")
    assert route.served and len(route.experts) == 1
    policy.observe(route.energy_j)
    assert policy.energy_queue.requests == 1 and policy.energy_queue.backlog_j > 0


@pytest.mark.parametrize(
    "change, field",
    [
        ({"experts": [{"name": "delta", "hardware": "rtx-4090"}]}, "experts[0].name"),
        ({"budgets": {"latency_s": {"math": 1.0}}}, "budgets.latency_s.history"),
        ({"categories": ["math"]}, "categories"),
        ({"data": {"source": "table", "format": "routerdc", "path": "nowhere.json"}}, "nowhere.json"),
    ],
)
def test_bad_run_files_fail_with_one_line_and_leave_no_run(tmp_path, capsys, change, field):
    run = tmp_path / "run"
    cfg = yaml.safe_load(config(tmp_path).read_text())
    cfg.update(change)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["collab", "fit", "--config", str(tmp_path / "bad.yaml"), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edgemoe collab: error:") and field in last and "Traceback" not in err
    assert not (run / "run.yaml").exists()


def test_example_run_files_parse():
    from pathlib import Path

    from edgemoe.collab.offline.runs import load_run_spec
    from edgemoe.config import load_yaml

    files = sorted((Path(__file__).resolve().parents[2] / "examples").glob("moe2-*.yaml"))
    assert files
    for f in files:
        spec = load_run_spec(load_yaml(f))
        assert spec.data.source == "table" and spec.deployment.experts


def test_table_with_option_distributions_fits_and_reloads(tmp_path):
    """Full option distributions (five options, categories from the data) through fit and reload."""
    from edgemoe.collab.offline.runs import build_run_data, calibrate, fit, load_run_spec, problem, save_run

    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        answer = int(rng.integers(0, 5))
        models = {}
        for m in MODELS:
            p = rng.dirichlet(np.ones(5))
            p[answer] += 1.0 if (m == "alpha") == (i % 2 == 0) else 0.2
            models[m] = {"probs": (p / p.sum()).tolist(), "output_tokens": 3}
        rows.append(
            {
                "id": f"q{i}",
                "prompt": f"question {i} " + "x" * (i % 7),
                "category": "ab"[i % 2],
                "answer": answer,
                "models": models,
            }
        )
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_run_spec(
        {
            "data": {"source": "table", "format": "table", "path": str(path)},
            "embedder": "hashing",
            "gate": {"steps": 30, "hidden": 8},
            "experts": [{"name": m, "hardware": "jetson-agx-orin"} for m in MODELS],
        }
    )
    ws = build_run_data(spec)
    assert not ws.correctness_only and ws.cache.probs_QNO.shape[2] == 5 and ws.config.categories == ["a", "b"]
    assert np.all(ws.output_tokens_Q == 3)
    gate = fit(ws, spec.gate)
    calibrate(ws, gate)
    save_run(tmp_path / "run", spec, ws, gate)
    again, gate2 = load_run(tmp_path / "run")
    np.testing.assert_allclose(again.cache.probs_QNO, ws.cache.probs_QNO, atol=1e-12)
    np.testing.assert_array_equal(again.questions.answer_Q, ws.questions.answer_Q)
    np.testing.assert_allclose(
        gate2.logits(again.emb_QD, again.questions.category_Q),
        gate.logits(ws.emb_QD, ws.questions.category_Q),
    )
    p = problem(again, gate2, "test")
    assert p.num_options == 5 and 0.0 <= p.evaluate(np.ones((1, 3), dtype=bool)).accuracy_B[0] <= 1.0
