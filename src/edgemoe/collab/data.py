"""Questions for MoE²: the :class:`QuestionSet` every source becomes, and the MMLU loader.

MMLU is read from ``{dev,test}/<subject>_{dev,test}.csv`` under ``qa/mmlu`` of the data root
(:mod:`edgemoe.paths`: ``--data-dir``, ``$EDGEMOE_DATA`` or the per-user default). The category map
follows the MMLU authors' grouping (STEM / humanities / social sciences / other).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.collab.profiles import MMLU_CATEGORIES
from edgemoe.collab.prompts import gate_prompt
from edgemoe.errors import ConfigError, DataError
from edgemoe.paths import dataset_dir, require_path

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
MMLU_SUBDIR = "qa/mmlu"


@dataclass
class QuestionSet:
    """Questions as parallel arrays (one row per question).

    ``subject`` is the raw label a question came with (an MMLU subject, a benchmark's category, or
    "" when none). ``text`` holds ready-made prompts (benchmarks that ship their prompt text); without
    it the prompt is built from ``question`` and the lettered ``choices`` (any number of options).
    For correctness-only data ``choices`` is empty and ``answer_Q`` is 0 (see ``AnswerCache``).
    """

    qid: list[str]
    subject: list[str]
    category_Q: np.ndarray
    question: list[str]
    choices: list[list[str]]
    answer_Q: np.ndarray
    categories: tuple[str, ...] = MMLU_CATEGORIES
    text: list[str] | None = None

    def __len__(self) -> int:
        return len(self.qid)

    @property
    def num_options(self) -> int:
        return max((len(c) for c in self.choices), default=4) or 4

    def prompt(self, i: int) -> str:
        """The prompt text of question ``i`` (given text, or question, lettered options, 'Answer:')."""
        if self.text is not None:
            return self.text[i]
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
            text=None if self.text is None else [self.text[i] for i in idx],
        )


def default_mmlu_dir(data_dir: str | Path | None = None) -> Path:
    """``<data root>/qa/mmlu`` (or ``data_dir`` itself when it already holds ``test/``); a
    :class:`DataError` saying where MMLU goes when it is not there."""
    if data_dir is not None and (Path(data_dir) / "test").is_dir():
        return Path(data_dir)
    path = dataset_dir(MMLU_SUBDIR, data_dir)
    return require_path(
        path / "test", "MMLU (test/<subject>_test.csv)", "MMLU is the CSV export of Hendrycks et al. (2021)."
    ).parent


def load_mmlu(
    data_dir: str | Path | None = None,
    split: str = "test",
    subjects: list[str] | None = None,
    limit_per_subject: int | None = None,
) -> QuestionSet:
    """Load MMLU questions (columns question, choice0..3, answer) with their categories.

    ``qid`` is ``<subject>/<split>/<row>`` so caches can be keyed across runs.
    """
    root = default_mmlu_dir(data_dir)
    folder = root / split
    if not folder.is_dir():
        raise DataError(str(folder), f"does not exist; expected {split}/<subject>_{split}.csv under it")
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
                raise DataError(str(available[s]), f"row {i + 2}: answer {ans} is not in 0..3")
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
