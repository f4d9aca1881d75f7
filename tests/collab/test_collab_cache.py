"""Answer cache: JSONL round trip, append/resume, clear errors."""

import numpy as np
import pytest

from edgemoe.collab.cache import AnswerCache, append_records, done_keys, make_record, read_cache
from edgemoe.errors import DataError


def _cache():
    rng = np.random.default_rng(0)
    p = rng.random((3, 2, 4))
    lat = np.array([[0.1, np.nan], [0.2, 0.3], [np.nan, np.nan]])
    return AnswerCache(["q0", "q1", "q2"], ["a", "b"], p / p.sum(2, keepdims=True), lat, lat * 10)


def test_roundtrip_and_select(tmp_path):
    c = _cache()
    c.write(tmp_path / "c.jsonl")
    back = read_cache(tmp_path / "c.jsonl")
    np.testing.assert_allclose(back.probs_QNO, c.probs_QNO)
    np.testing.assert_array_equal(np.isnan(back.latency_QN), np.isnan(c.latency_QN))
    sub = back.select(qids=["q2", "q0"], experts=["b"])
    np.testing.assert_allclose(sub.probs_QNO[:, 0], c.probs_QNO[[2, 0], 1])


def test_append_resume_and_last_record_wins(tmp_path):
    path = tmp_path / "c.jsonl"
    assert done_keys(path) == set()
    append_records(path, [make_record("q0", "a", [1, 0, 0, 0])])
    append_records(path, [make_record("q0", "b", [0, 1, 0, 0], latency_s=0.5)])
    append_records(path, [make_record("q0", "a", [0, 0, 1, 0])])
    with path.open("a") as fh:
        fh.write('{"qid": "q1", "exp')  # an interrupted write
    assert done_keys(path) == {("q0", "a"), ("q0", "b")}
    c = read_cache(path)
    assert c.probs_QNO[0, 0].tolist() == [0, 0, 1, 0]
    assert c.latency_QN[0].tolist()[1] == 0.5


def test_missing_pair_and_bad_probs_are_clear(tmp_path):
    path = tmp_path / "c.jsonl"
    append_records(path, [make_record("q0", "a", [0.5, 0.5, 0, 0]), make_record("q1", "b", [0.5, 0.5, 0, 0])])
    with pytest.raises(DataError, match="no record for question 'q0' and expert 'b'"):
        read_cache(path)
    bad = tmp_path / "bad.jsonl"
    append_records(bad, [make_record("q0", "a", [0.9, 0.9, 0, 0])])
    with pytest.raises(DataError, match="summing to 1"):
        read_cache(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_cache(tmp_path / "none.jsonl")
