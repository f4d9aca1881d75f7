"""MMLU loader on files written in the exact format; category map; clear errors."""

import csv

import numpy as np
import pytest

from edgemoe.collab.data import SUBJECT_CATEGORY, default_mmlu_dir, load_mmlu
from edgemoe.collab.embed import HashingEmbedder, make_embedder
from edgemoe.collab.profiles import MMLU_CATEGORIES
from edgemoe.config import ConfigError
from edgemoe.errors import DataError


def _write(folder, subject, rows):
    (folder / "test").mkdir(parents=True, exist_ok=True)
    with (folder / "test" / f"{subject}_test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        w.writerows(rows)


def test_load_mmlu_format_and_categories(tmp_path):
    _write(tmp_path, "anatomy", [["Which bone, in the arm?", "a", "b", "c", "d", 2]])
    _write(tmp_path, "philosophy", [["Q1", "a", "b", "c", "d", 0], ["Q2", "w", "x", "y", "z", 3]])
    qs = load_mmlu(tmp_path)
    assert qs.qid == ["anatomy/test/0", "philosophy/test/0", "philosophy/test/1"]
    assert [MMLU_CATEGORIES[c] for c in qs.category_Q] == ["other", "humanities", "humanities"]
    assert qs.answer_Q.tolist() == [2, 0, 3]
    assert qs.prompt(0).startswith("Which bone, in the arm?\nA. a\nB. b")
    assert len(load_mmlu(tmp_path, limit_per_subject=1)) == 2
    with pytest.raises(ConfigError, match="unknown subject"):
        load_mmlu(tmp_path, subjects=["astrology"])


def test_category_map_covers_mmlu():
    assert len(SUBJECT_CATEGORY) == 57
    assert set(SUBJECT_CATEGORY.values()) == set(MMLU_CATEGORIES)


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:
        default_mmlu_dir()
    assert str(tmp_path / "nowhere" / "qa" / "mmlu") in str(info.value) and "EDGEMOE_DATA" in str(info.value)


def test_hashing_embedder_is_deterministic_and_normalised():
    a = HashingEmbedder(dim=32).encode(["the cell membrane", "supreme court ruling"])
    b = make_embedder("hashing", dim=32).encode(["the cell membrane", "supreme court ruling"])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ConfigError):
        make_embedder("word2vec")
