"""``collab compare`` on a fitted run: closed-form checks of the single-expert and uniform rows."""

from __future__ import annotations

import argparse
import json

import numpy as np

from edgemoe.cli.collab_llm import register_collab
from edgemoe.collab.offline.runs import build_run_data, fit, load_run_spec, problem, save_run


def test_compare_rows_match_the_cache(tmp_path):
    spec = load_run_spec(
        {
            "experts": [
                {"name": "small", "hardware": "jetson-orin-nano", "params_b": 0.5, "skill": {"base": 0.4}},
                {"name": "big", "hardware": "jetson-agx-orin", "params_b": 3.0, "skill": {"base": 0.7}},
            ],
            "data": {"source": "synthetic", "synthetic_questions": 120},
            "embedder": "hashing",
            "gate": {"steps": 20, "hidden": 8},
        }
    )
    ws = build_run_data(spec)
    gate = fit(ws, spec.gate)
    save_run(tmp_path / "run", spec, ws, gate)
    parser = argparse.ArgumentParser()
    register_collab(parser.add_subparsers())
    args = parser.parse_args(["compare", "--run", str(tmp_path / "run"), "--energy-fraction", "1.0"])
    assert args.func(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "run/compare/compare.json").read_text())["rows"]}
    idx = ws.index("test")
    probs_QNO, answer_Q = ws.cache.probs_QNO[idx], ws.questions.answer_Q[idx]
    for n, name in enumerate(ws.config.expert_names):
        expected = float((probs_QNO[:, n].argmax(-1) == answer_Q).mean())
        assert rows[f"single: {name}"]["accuracy"] == expected
    uniform = float((probs_QNO.mean(axis=1).argmax(-1) == answer_Q).mean())
    assert rows["uniform ensemble (all)"]["accuracy"] == uniform
    assert rows["uniform ensemble (all)"]["experts"] == "small big"
    # Energy: the core's per-question figure for that expert (modelled here: the cache is simulated).
    test = problem(ws, gate, "test")
    for n, name in enumerate(ws.config.expert_names):
        assert rows[f"single: {name}"]["energy_j"] == np.float64(test.energy_QN[:, n].mean())
    assert rows["uniform ensemble (all)"]["energy_j"] == np.float64(test.energy_QN.sum(axis=1).mean())
    assert (tmp_path / "run/compare/compare.md").read_text().count("\n") == 2 + len(
        json.loads((tmp_path / "run/compare/compare.json").read_text())["rows"]
    )
    # The oracle is at least as good as every single expert and every other row.
    assert rows["oracle (per question)"]["accuracy"] >= max(r.get("accuracy", 0) for r in rows.values())
