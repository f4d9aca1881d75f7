"""The one run-folder helper: a used ``--out`` is refused, default names never collide, and only a
command that continues a run may write into a folder that already holds one."""

from __future__ import annotations

import pytest

from edgemoe.cli import main
from edgemoe.errors import ConfigError
from edgemoe.runs import RunFolder, check_out_dir, default_run_path, run_path


def test_a_folder_holding_a_run_is_refused_naming_out_and_the_fix(tmp_path):
    used = tmp_path / "used"
    RunFolder(used).json("summary.json", {"a": 1})
    with pytest.raises(ConfigError) as info:
        run_path(used, tmp_path, "sim")
    assert info.value.field == "--out"
    assert "already holds a previous run" in str(info.value) and "delete it" in str(info.value)
    assert check_out_dir(used, resuming=True) == used  # a command continuing the run may reuse it
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".summary.json.tmp-1").write_text("stale temp")  # hidden temps are not a run
    assert run_path(empty, tmp_path, "sim") == empty
    assert run_path(tmp_path / "new", tmp_path, "sim") == tmp_path / "new"


def test_default_names_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr("edgemoe.runs.time.strftime", lambda fmt: "20260101-000000")
    names = []
    for _ in range(3):
        path = default_run_path(tmp_path, "sim")
        path.mkdir()
        names.append(path.name)
    assert names == ["sim-20260101-000000", "sim-20260101-000000-2", "sim-20260101-000000-3"]
    assert run_path(None, tmp_path, "sim").name == "sim-20260101-000000-4"


def test_run_folder_context_removes_an_empty_folder_it_created_on_failure(tmp_path):
    with pytest.raises(RuntimeError), RunFolder(tmp_path / "r") as folder:
        folder.create()
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "r").exists()


def test_simulate_into_a_used_out_is_one_line_and_leaves_the_old_run(tmp_path, capsys):
    out = tmp_path / "sim"
    args = ["simulate", "--slots", "3", "--seeds", "1", "--policies", "topk", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "choose another folder or delete it" in err
    assert sorted(p.name for p in out.rglob("*")) == before
