"""MMLU: loader for ``{dev,test}/<subject>_{dev,test}.csv`` and the subject → category map.

The category map follows the MMLU authors' grouping (STEM / humanities / social sciences / other).
The data folder is ``$EDGEMOE_MMLU_DIR`` if set, else ``../shared/data/qa/mmlu`` next to the
repository (resolved from this file, then from the working directory).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.collab.profiles import MMLU_CATEGORIES
from edgemoe.collab.prompts import gate_prompt
from edgemoe.config import ConfigError

_STEM = (
    "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning"
)
_HUMANITIES = (
    "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
    "prehistory professional_law world_religions"
)
_SOCIAL = (
    "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
    "public_relations security_studies sociology us_foreign_policy"
)
_OTHER = (
    "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
    "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
)
SUBJECT_CATEGORY: dict[str, str] = {
    s: cat
    for cat, names in zip(MMLU_CATEGORIES, (_STEM, _HUMANITIES, _SOCIAL, _OTHER))
    for s in names.split()
}
MMLU_DIR_ENV = "EDGEMOE_MMLU_DIR"


@dataclass
class QuestionSet:
    """Multiple-choice questions as parallel arrays (one row per question)."""

    qid: list[str]
    subject: list[str]
    category_Q: np.ndarray
    question: list[str]
    choices: list[list[str]]
    answer_Q: np.ndarray
    categories: tuple[str, ...] = MMLU_CATEGORIES

    def __len__(self) -> int:
        return len(self.qid)

    @property
    def num_options(self) -> int:
        return len(self.choices[0]) if self.choices else 4

    def prompt(self, i: int) -> str:
        """The plain prompt text of question ``i`` (question, lettered options, 'Answer:')."""
        return gate_prompt(self.question[i], self.choices[i])

    def prompts(self) -> list[str]:
        return [self.prompt(i) for i in range(len(self))]

    def take(self, index: np.ndarray) -> QuestionSet:
        idx = [int(i) for i in np.asarray(index)]
        return QuestionSet(
            qid=[self.qid[i] for i in idx],
            subject=[self.subject[i] for i in idx],
            category_Q=self.category_Q[idx],
            question=[self.question[i] for i in idx],
            choices=[self.choices[i] for i in idx],
            answer_Q=self.answer_Q[idx],
            categories=self.categories,
        )


def default_mmlu_dir() -> Path:
    """Resolve the MMLU folder (see module doc); a clear error when it is not there."""
    env = os.environ.get(MMLU_DIR_ENV)
    if env:
        candidates = [Path(env)]
    else:
        repo = Path(__file__).resolve().parents[3]
        candidates = [
            repo.parent / "shared" / "data" / "qa" / "mmlu",
            Path.cwd().parent / "shared/data/qa/mmlu",
        ]
    for path in candidates:
        if (path / "test").is_dir():
            return path
    raise ConfigError(
        "data_dir",
        f"no MMLU folder found (looked in {[str(c) for c in candidates]}); pass --data-dir or set "
        f"{MMLU_DIR_ENV} to a folder holding test/<subject>_test.csv",
    )


def load_mmlu(
    data_dir: str | Path | None = None,
    split: str = "test",
    subjects: list[str] | None = None,
    limit_per_subject: int | None = None,
) -> QuestionSet:
    """Load MMLU questions (columns question, choice0..3, answer) with their categories.

    ``qid`` is ``<subject>/<split>/<row>`` so caches can be keyed across runs.
    """
    root = Path(data_dir) if data_dir is not None else default_mmlu_dir()
    folder = root / split
    if not folder.is_dir():
        raise ConfigError(
            "data_dir", f"{folder} does not exist; expected {split}/<subject>_{split}.csv under it"
        )
    files = sorted(folder.glob(f"*_{split}.csv"))
    available = {f.name[: -len(f"_{split}.csv")]: f for f in files}
    wanted = sorted(available) if subjects is None else subjects
    for s in wanted:
        if s not in available:
            raise ConfigError("subjects", f"unknown subject {s!r}; available: {sorted(available)}")
        if s not in SUBJECT_CATEGORY:
            raise ConfigError("subjects", f"subject {s!r} has no category; known: {sorted(SUBJECT_CATEGORY)}")
    cat_index = {c: i for i, c in enumerate(MMLU_CATEGORIES)}
    qid, subj, cats, question, choices, answer = [], [], [], [], [], []
    for s in wanted:
        with available[s].open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if limit_per_subject is not None:
            rows = rows[:limit_per_subject]
        for i, row in enumerate(rows):
            opts = [row[f"choice{j}"] for j in range(4)]
            ans = int(row["answer"])
            if not 0 <= ans < 4:
                raise ConfigError("answer", f"{available[s]} row {i}: answer {ans} is not in 0..3")
            qid.append(f"{s}/{split}/{i}")
            subj.append(s)
            cats.append(cat_index[SUBJECT_CATEGORY[s]])
            question.append(row["question"])
            choices.append(opts)
            answer.append(ans)
    return QuestionSet(
        qid=qid,
        subject=subj,
        category_Q=np.array(cats, dtype=np.int64),
        question=question,
        choices=choices,
        answer_Q=np.array(answer, dtype=np.int64),
    )


def synthetic_questions(num: int, subjects: list[str] | None = None, seed: int = 0) -> QuestionSet:
    """Small stand-in question set with MMLU subjects (for tests and dry runs; no files needed)."""
    rng = np.random.default_rng(seed)
    subjects = subjects or sorted(SUBJECT_CATEGORY)
    cat_index = {c: i for i, c in enumerate(MMLU_CATEGORIES)}
    subj = [subjects[i % len(subjects)] for i in range(num)]
    words = ["energy", "law", "market", "cell", "proof", "war", "mind", "price", "atom", "court"]
    question = [f"Q{i} about {s}: " + " ".join(rng.choice(words, size=6)) for i, s in enumerate(subj)]
    return QuestionSet(
        qid=[f"{s}/synthetic/{i}" for i, s in enumerate(subj)],
        subject=subj,
        category_Q=np.array([cat_index[SUBJECT_CATEGORY[s]] for s in subj], dtype=np.int64),
        question=question,
        choices=[[f"option {j}" for j in range(4)] for _ in range(num)],
        answer_Q=rng.integers(0, 4, size=num),
    )
