"""``collab build-cache``: every (question, expert) answered once; interruptions resume cleanly."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgemoe.cli.collab_llm import register_collab
from edgemoe.collab.backends import TinyConfig, build_backend
from edgemoe.collab.build_cache import build_cache, question_prompt, repair_tail, stratified_subset
from edgemoe.collab.cache import iter_records, read_cache
from edgemoe.collab.data import load_mmlu
from edgemoe.collab.profiles import ExpertProfile
from edgemoe.config import ConfigError
from edgemoe.testing import TinyOpenAIServer

SUBJECTS = {"abstract_algebra": 6, "philosophy": 5, "sociology": 4, "anatomy": 5}  # one per category


def write_mmlu(root: Path) -> Path:
    """A small MMLU folder in the official layout (question, choice0..3, answer)."""
    (root / "test").mkdir(parents=True)
    for subject, rows in SUBJECTS.items():
        with (root / "test" / f"{subject}_test.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for i in range(rows):
                writer.writerow([f"{subject} question {i}?", "w", "x", "y", "z", i % 4])
    return root


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_collab(parser.add_subparsers())
    return parser.parse_args(argv)


class Counting:
    """Wraps a backend factory and counts the questions it is asked."""

    def __init__(self, cfg: TinyConfig, name: str):
        self.cfg, self.name, self.calls = cfg, name, 0

    def __call__(self):
        backend = build_backend(self.name, self.cfg)
        inner = backend.score_choices

        def score(prompt, n):
            self.calls += 1
            return inner(prompt, n)

        backend.score_choices = score
        return backend


def test_interrupted_run_resumes_without_redoing_or_losing_answers(tmp_path):
    questions = stratified_subset(load_mmlu(write_mmlu(tmp_path / "mmlu")), per_category=3, seed=1)
    assert len(questions) == 12 and np.bincount(questions.category_Q).tolist() == [3, 3, 3, 3]
    profiles = [ExpertProfile("a", hardware="jetson-orin-nano"), ExpertProfile("b", hardware="rtx-4090")]
    counters = [Counting(TinyConfig(seed=s), p.name) for s, p in zip((1, 2), profiles)]
    out = tmp_path / "answers.jsonl"

    first = build_cache(list(zip(profiles, counters)), questions, out, progress=False, max_answers=7)
    assert first.interrupted and first.answered == 7
    before = out.read_text().splitlines()
    with out.open("a") as fh:
        fh.write('{"qid": "anatomy/test/1", "exp')  # a write cut short by the interruption

    second = build_cache(list(zip(profiles, counters)), questions, out, progress=False)
    assert not second.interrupted and second.skipped == 7 and second.answered == 24 - 7
    assert sum(c.calls for c in counters) == 24  # nothing was asked twice
    lines = out.read_text().splitlines()
    assert lines[:7] == before  # finished answers kept byte for byte
    keys = [(r["qid"], r["expert"]) for r in iter_records(out)]
    assert len(keys) == len(set(keys)) == 24

    # A third run has nothing left to do; the cache matches the experts answering directly.
    assert build_cache(list(zip(profiles, counters)), questions, out, progress=False).answered == 0
    cache = read_cache(out, qids=questions.qid, experts=["a", "b"])
    ref = build_backend("a", TinyConfig(seed=1))
    for i in (0, 5, 11):
        np.testing.assert_allclose(
            cache.probs_QNO[i, 0], ref.score_choices(question_prompt(questions, i), 4).probs
        )
    power = np.array([profiles[0].power, profiles[1].power])
    np.testing.assert_allclose(cache.energy_QN, cache.latency_QN * power[None, :])


def test_repair_tail(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"a": 1}\n{"b"')
    assert repair_tail(path) == 4 and path.read_text() == '{"a": 1}\n'
    assert repair_tail(path) == 0


def experts_yaml(tmp_path: Path, url: str) -> Path:
    cfg = {
        "experts": [
            {"name": "near", "hardware": "jetson-orin-nano", "backend": {"kind": "openai", "url": url}},
            {"name": "local", "hardware": "jetson-agx-orin", "backend": {"kind": "tiny", "seed": 4}},
        ]
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_killed_mid_run_then_resumed(tmp_path):
    """SIGKILL the real command while it writes, then rerun it: complete, nothing lost or repeated."""
    data = write_mmlu(tmp_path / "mmlu")
    out = tmp_path / "run"
    with TinyOpenAIServer(5, delay_s=0.05) as srv:
        argv = ["build-cache", "--experts", str(experts_yaml(tmp_path, srv.url)), "--data-dir", str(data)]
        argv += ["--per-category", "4", "--out", str(out), "--no-progress"]
        code = (
            "import argparse, sys\n"
            "from edgemoe.cli.collab_llm import register_collab\n"
            "p = argparse.ArgumentParser(); register_collab(p.add_subparsers())\n"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL)
        answers = out / "answers.jsonl"
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                if answers.is_file() and len(answers.read_text().splitlines()) >= 4:
                    break
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        kept = [line for line in answers.read_text().splitlines(keepends=True) if line.endswith("\n")]
        assert 4 <= len(kept) < 32, "the run was not interrupted mid-way"
        args = parse(argv)
        assert args.func(args) == 0
    records = list(iter_records(answers))
    assert len({(r["qid"], r["expert"]) for r in records}) == len(records) == 32
    assert answers.read_text().startswith("".join(kept))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and set(summary["per_expert"]) == {"near", "local"}
    assert 0.0 <= summary["per_expert"]["near"]["accuracy"] <= 1.0

    # Resuming with another question draw would mix two caches: refused.
    other = parse([*argv[:-3], "--seed", "7", "--out", str(out), "--no-progress"])
    with pytest.raises(ConfigError, match="different question set"):
        other.func(other)
