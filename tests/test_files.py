"""edgemoe.files: every result file is written whole or not at all."""

import csv
import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgemoe.files import atomic_write_bytes, save_figure, write_csv, write_json, write_text  # noqa: E402


def test_json_round_trip_with_numpy_scalars(tmp_path):
    path = write_json(tmp_path / "a" / "s.json", {"x": np.float32(0.5), "n": [1, 2]})
    assert json.loads(path.read_text()) == {"x": 0.5, "n": [1, 2]}


def test_csv_from_mappings_and_from_sequences(tmp_path):
    rows = [{"slot": 0, "tokens": 5}, {"slot": 1, "tokens": 7}]
    write_csv(tmp_path / "d.csv", rows)
    assert list(csv.DictReader((tmp_path / "d.csv").open())) == [
        {"slot": "0", "tokens": "5"},
        {"slot": "1", "tokens": "7"},
    ]
    write_csv(tmp_path / "s.csv", [[0, 1.5], [1, 2.5]], header=["slot", "x"])
    assert (tmp_path / "s.csv").read_text() == "slot,x\n0,1.5\n1,2.5\n"
    write_csv(tmp_path / "h.csv", [], header=["slot", "x"])
    assert (tmp_path / "h.csv").read_text() == "slot,x\n"
    write_csv(tmp_path / "e.csv", [])
    assert (tmp_path / "e.csv").read_text() == ""


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "t.csv", "old\n")

    def rows():
        yield [1, 2]
        raise RuntimeError("generator failed half-way")

    with pytest.raises(RuntimeError):
        write_csv(target, rows(), header=["a", "b"])
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_atomic_write_cleans_up_when_the_rename_fails(tmp_path):
    (tmp_path / "dir.bin").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "dir.bin", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.bin"]


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "p.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
