"""Readers of the routing-table format and the public router-benchmark layouts, on small files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from edgemoe.collab.table import concat_tables, count_options, read_benchmark, read_table, write_table
from edgemoe.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, header, rows):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


FIVE = "Pick one\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:"


def test_table_format_with_distributions_and_measurements(tmp_path):
    rows = [
        {
            "id": "q1",
            "prompt": FIVE,
            "category": "logic",
            "answer": 4,
            "models": {
                "m1": {"probs": [0.1, 0.1, 0.1, 0.1, 0.6], "latency_s": 0.5, "output_tokens": 3},
                "m2": {"probs": [0.6, 0.1, 0.1, 0.1, 0.1], "cost": 0.01},
            },
        },
        {
            "id": "q2",
            "prompt": "Yes or no?\nA. yes\nB. no\nAnswer:",
            "category": "logic",
            "answer": 1,
            "models": {"m2": {"probs": [0.3, 0.7]}, "m1": {"probs": [0.5, 0.5]}},
        },
    ]
    t = read_table(write_jsonl(tmp_path / "t.jsonl", rows))
    assert t.models == ["m1", "m2"] and not t.correctness_only
    assert t.num_options_Q.tolist() == [5, 2] and t.probs_QNO.shape == (2, 2, 5)
    np.testing.assert_allclose(t.quality_QN, [[0.6, 0.1], [0.5, 0.7]])
    assert t.latency_QN[0, 0] == 0.5 and np.isnan(t.latency_QN[0, 1]) and t.cost_QN[0, 1] == 0.01
    again = read_table(write_table(t, tmp_path / "again.jsonl"))
    np.testing.assert_array_equal(again.probs_QNO, t.probs_QNO)
    assert again.qid == t.qid and again.category == t.category
    np.testing.assert_array_equal(again.output_tokens_QN, t.output_tokens_QN)


def test_routerdc_json(tmp_path):
    path = tmp_path / "rdc.json"
    path.write_text(
        json.dumps(
            [
                {"question": FIVE, "scores": {"a": 1, "b": 0.25}, "cluster_id": 3},
                {"question": "What is 2+2?", "scores": {"b": 1.0, "a": 0}},
            ]
        )
    )
    t = read_benchmark("routerdc", path)
    assert t.correctness_only and t.models == ["a", "b"]
    np.testing.assert_allclose(t.quality_QN, [[1.0, 0.25], [0.0, 1.0]])
    assert t.num_options_Q.tolist() == [5, 0]


def test_routellm_folder_drops_contaminated_prompts(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    header = ["prompt", "weak", "strong", "weak_response"]
    write_csv(
        folder / "mmlu_anatomy.csv", header, [["p1", "True", "True", "x"], ["p2", "False", "True", "y"]]
    )
    write_csv(folder / "mmlu_law.csv", header, [["p3", "True", "False", "z"]])
    write_jsonl(folder / "contaminated_prompts.jsonl", [{"eval_prompt": "p2", "train_prompt": "p2"}])
    t = read_benchmark("routellm", folder)
    assert t.prompt == ["p1", "p3"] and t.category == ["anatomy", "law"] and t.models == ["weak", "strong"]
    np.testing.assert_array_equal(t.quality_QN, [[1, 1], [1, 0]])


def test_routerbench_csv_with_costs(tmp_path):
    path = write_csv(
        tmp_path / "rb.csv",
        ["sample_id", "prompt", "eval_name", "gpt|total_cost", "gpt", "llama", "llama|model_response"],
        [
            ["s1", "hello", "mmlu", "0.002", "1.0", "0.0", "hi"],
            ["s2", "world", "gsm8k", "0.003", "0.5", "1", "x"],
        ],
    )
    t = read_benchmark("routerbench", path)
    assert t.models == ["gpt", "llama"] and t.qid == ["s1", "s2"] and t.category == ["mmlu", "gsm8k"]
    assert t.cost_QN[:, 0].tolist() == [0.002, 0.003] and np.isnan(t.cost_QN[:, 1]).all()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "x", "models": {"a": {"quality": float("nan")}}}], "models.a.quality"),
        ([{"prompt": "x", "models": {"a": {"quality": -0.5}}}], "models.a.quality"),
        ([{"prompt": "x", "models": {"a": {"quality": 1, "cost": -1}}}], "models.a.cost"),
        (
            [
                {"prompt": "x", "models": {"a": {"quality": 1}}},
                {"prompt": "x", "models": {"a": {"quality": 0}}},
            ],
            "duplicate",
        ),
        (
            [
                {"prompt": "x", "models": {"a": {"quality": 1}}},
                {"prompt": "y", "models": {"b": {"quality": 0}}},
            ],
            "other models",
        ),
        ([{"prompt": "", "models": {"a": {"quality": 1}}}], "prompt"),
        ([{"prompt": "x", "models": {"a": {"probs": [0.5, 0.5]}}}], "answer"),
        ([{"prompt": "x", "models": {"a": {}}}], "needs 'quality'"),
        ([], "empty benchmark"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert message in str(info.value) and str(path) in str(info.value)
    if rows:
        assert ":1" in str(info.value) or ":2" in str(info.value)


def test_malformed_line_and_duplicate_policies(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "x", "models": {"a": {"quality": 1}}}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: is not valid JSON"):
        read_table(bad)
    rows = [
        {"prompt": "x", "models": {"a": {"quality": 1}}},
        {"prompt": "x", "models": {"a": {"quality": 0}}},
    ]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    assert len(read_table(path, duplicates="first")) == 1
    kept = read_table(path, duplicates="keep")
    assert len(kept) == 2 and len(set(kept.qid)) == 2
    with pytest.raises(ConfigError, match="data.format"):
        read_benchmark("helm", path)


def test_option_counting_and_concat(tmp_path):
    assert count_options(FIVE) == 5 and count_options("no options here") == 0
    assert count_options("Q\nA. x\nC. y") == 0  # not a run A, B, C
    a = read_table(
        write_jsonl(
            tmp_path / "a.jsonl", [{"prompt": "p", "models": {"m": {"quality": 1}, "n": {"quality": 0}}}]
        )
    )
    b = read_table(
        write_jsonl(
            tmp_path / "b.jsonl", [{"prompt": "p", "models": {"n": {"quality": 1}, "m": {"quality": 0}}}]
        )
    )
    both = concat_tables(a, b)
    assert both.qid == ["0", "test:0"]
    np.testing.assert_array_equal(both.quality_QN, [[1, 0], [0, 1]])
