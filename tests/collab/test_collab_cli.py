"""End to end: collab fit → select → sweep → eval on synthetic questions (no data files)."""

import json

import numpy as np
import pytest

from edgemoe.cli import build_parser, main
from edgemoe.collab.data import synthetic_questions
from edgemoe.collab.gate import GateConfig, train_gate
from edgemoe.collab.offline.assumptions import optimality_gap
from edgemoe.collab.offline.runs import load_policy
from edgemoe.collab.profiles import MMLU_CATEGORIES
from edgemoe.collab.synthetic_answers import default_experts, generate_cache


@pytest.mark.slow
def test_fit_select_sweep_eval(tmp_path):
    run = tmp_path / "run"
    fit = [
        "collab",
        "fit",
        "--synthetic",
        "240",
        "--experts",
        "4",
        "--embedder",
        "hashing",
        "--set",
        "gate.steps=30",
        "--out",
        str(run),
    ]
    assert main(fit) == 0
    assert (run / "gate.pt").is_file() and (run / "cache.jsonl").is_file() and (run / "experts.csv").is_file()
    route = load_policy(run, enabled=["nano-1b-0", "orin-3b-1"]).route("Which organ filters blood?", "other")
    assert set(route.experts) <= {"nano-1b-0", "orin-3b-1"} and route.served
    assert (
        main(
            [
                "collab",
                "select",
                "--run",
                str(run),
                "--energy-fraction",
                "0.5",
                "--out",
                str(tmp_path / "sel"),
            ]
        )
        == 0
    )
    sel = json.loads((tmp_path / "sel" / "summary.json").read_text())
    assert sel["feasible"] and sel["energy_j"] <= sel["energy_budget_j"] + 1e-9
    assert (
        main(["collab", "select", "--run", str(run), "--energy", "1e-6", "--out", str(tmp_path / "none")])
        == 0
    )
    assert not json.loads((tmp_path / "none" / "summary.json").read_text())["feasible"]
    sweep = [
        "collab",
        "sweep",
        "--run",
        str(run),
        "--energy-fractions",
        "0.01,0.2,0.6",
        "--latency-budgets",
        "0.05,1.0",
        "--out",
        str(tmp_path / "sw"),
    ]
    assert main(sweep) == 0
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert summary["dmo_equals_exhaustive"] and summary["within_budget"]
    for name in ("sweep.csv", "sweep.json", "accuracy_vs_energy.png", "accuracy_vs_latency.png"):
        assert (tmp_path / "sw" / name).is_file()
    ev = ["collab", "eval", "--run", str(run), "--gap-steps", "5", "--out", str(tmp_path / "ev")]
    assert main(ev) == 0
    out = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert all(c["exact"] for c in out["dmo_monotone_check"])
    assert out["optimality_gap"]["subsets"] == 15 and (tmp_path / "ev" / "optimality_gap.png").is_file()


def test_bad_config_is_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("experts:\n  - {name: a, power_w: -3}\n")
    assert main(["collab", "fit", "--config", str(cfg), "--synthetic", "20"]) == 2
    assert "experts[0].power_w" in capsys.readouterr().err


def test_collab_group_lists_subcommands():
    text = build_parser().parse_args(["collab", "fit", "--synthetic", "5"])
    assert text.collab_command == "fit"


def test_generator_matches_profile_skill_and_errors_correlate():
    qs = synthetic_questions(4000, subjects=["anatomy", "philosophy"], seed=1)
    experts = default_experts(3, list(MMLU_CATEGORIES), seed=0)
    for e in experts:
        e.skill.subject_jitter = 0.0
        e.skill.categories = {}
    cache = generate_cache(qs, experts)
    pick = cache.probs_QNO.argmax(axis=2)
    acc = (pick == qs.answer_Q[:, None]).mean(axis=0)
    np.testing.assert_allclose(acc, [e.skill.base for e in experts], atol=0.03)
    both_wrong = (pick[:, 0] != qs.answer_Q) & (pick[:, 1] != qs.answer_Q)
    assert both_wrong.mean() > (1 - acc[0]) * (1 - acc[1]) + 0.03  # shared difficulty
    same_wrong = (pick[both_wrong, 0] == pick[both_wrong, 1]).mean()
    assert same_wrong > 1 / 3 + 0.05  # shared distractors


def test_optimality_gap_shapes():
    rng = np.random.default_rng(0)
    emb, cat = rng.normal(size=(120, 6)).astype(np.float32), rng.integers(0, 4, 120)
    probs = rng.dirichlet(np.ones(4), size=(120, 3))
    answer = rng.integers(0, 4, 120)
    correct = probs[np.arange(120), :, answer]
    cfg = GateConfig(hidden=4, steps=10)

    def train(mask=None):
        return train_gate(emb, cat, correct, ["a", "b", "c"], list(MMLU_CATEGORIES), cfg, mask_N=mask)

    gap = optimality_gap(train(), train, emb, cat, probs, answer)
    assert gap["subsets"] == 7 and len(gap["rows"]) == 7
    singles = [r for r in gap["rows"] if r["size"] == 1]
    assert all(np.isclose(r["ce_restricted"], r["ce_retrained"]) for r in singles)
