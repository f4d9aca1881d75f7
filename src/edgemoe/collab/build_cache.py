"""Run every expert over a multiple-choice benchmark and write the MoE² answer cache.

Records go to the core's JSON Lines cache (``edgemoe.collab.cache``), one line per (question,
expert), flushed as soon as it is answered. A rerun with the same output file skips every pair
already there, so an interrupted run (Ctrl-C, a crash, a killed machine) resumes where it stopped
without redoing or losing answers; a line cut short by the interruption is removed first.

Experts run one after another (expert-major order), so only one local model is in memory at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe.collab.backends import LLMBackend
from edgemoe.collab.cache import done_keys, make_record
from edgemoe.collab.data import QuestionSet
from edgemoe.collab.profiles import ExpertProfile
from edgemoe.collab.prompts import mc_prompt


def stratified_subset(questions: QuestionSet, per_category: int, seed: int = 0) -> QuestionSet:
    """``per_category`` questions from each category, drawn at random (seeded) across its subjects.

    Kept in the original (subject, row) order so the file reads naturally.
    """
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(len(questions.categories)):
        idx = np.flatnonzero(questions.category_Q == c)
        picked.extend(rng.permutation(idx)[:per_category].tolist())
    return questions.take(np.array(sorted(picked), dtype=np.int64))


def question_prompt(questions: QuestionSet, i: int) -> str:
    """The prompt every expert sees for question ``i`` (the same text the gateway builds)."""
    return mc_prompt(questions.question[i], questions.choices[i], questions.subject[i])


def repair_tail(path: Path) -> int:
    """Cut a last line left incomplete by an interrupted write; returns the bytes removed."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("rb+") as fh:
        fh.truncate(keep)
    return len(data) - keep


@dataclass
class CacheRunStats:
    answered: int
    skipped: int
    total: int
    interrupted: bool


def build_cache(
    experts: Iterable[tuple[ExpertProfile, Callable[[], LLMBackend]]],
    questions: QuestionSet,
    out_path: str | Path,
    *,
    progress: bool = True,
    max_answers: int | None = None,
) -> CacheRunStats:
    """Answer every (question, expert) pair missing from ``out_path`` and append it there.

    ``experts`` pairs each profile with a factory, so a backend is built (and a local model
    loaded) only if it has work left. ``max_answers`` stops early (a deliberate interruption).
    Energy per answer is modelled: the expert's power × its measured latency.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(out_path)
    done = done_keys(out_path)
    experts = list(experts)
    todo = [
        (profile, make, [i for i in range(len(questions)) if (questions.qid[i], profile.name) not in done])
        for profile, make in experts
    ]
    total = len(questions) * len(experts)
    remaining = sum(len(items) for _, _, items in todo)
    answered, interrupted = 0, False
    bar = tqdm(total=total, initial=total - remaining, disable=not progress, desc="answer cache", unit="ans")
    try:
        with out_path.open("a") as fh:
            for profile, make, items in todo:
                if not items:
                    continue
                backend = make()
                bar.set_postfix_str(profile.name)
                try:
                    for i in items:
                        if max_answers is not None and answered >= max_answers:
                            interrupted = True
                            break
                        scores = backend.score_choices(
                            question_prompt(questions, i), len(questions.choices[i])
                        )
                        rec = make_record(
                            questions.qid[i],
                            profile.name,
                            scores.probs,
                            latency_s=scores.latency_s,
                            energy_j=profile.power * scores.latency_s,
                        )
                        fh.write(json.dumps(rec) + "\n")
                        fh.flush()
                        answered += 1
                        bar.update(1)
                finally:
                    backend.close()
                if interrupted:
                    break
            os.fsync(fh.fileno())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return CacheRunStats(answered, total - remaining, total, interrupted)
