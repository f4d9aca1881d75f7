"""Clean stops and whole-job restarts of ``edgemoe train``: Ctrl-C (SIGINT to the process group) on a
``dist`` run exits within seconds with the results written; ``--resume auto`` continues the run in
the same folder; a failed start leaves no run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgemoe.cli import main

TINY = ["--set", "model.dim=16", "--set", "model.expert_hidden=16", "--set", "model.channels=4"]
# three servers keep process start-up short; the exponent floats check the YAML 1.2 float rule
NET = "network.servers=[{f_max: 1.0e9, cycles_per_token: 1e8, kappa: 1.0e-28, energy_budget: 0.5, count: 3}]"
BASE = ["--scale", "0.05", "--train-subset", "100", "--test-subset", "40", "--eval-every", "1000", *TINY]
BASE += ["--set", NET]


def edgemoe(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "edgemoe", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout_s: float = 90.0) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < end
        time.sleep(0.05)


def check_stopped_run(out: Path) -> None:
    """Results written for the slots done; ``--resume auto`` then continues in the same folder."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slots"] >= 1
    assert (out / "slots.csv").read_text().count("\n") == summary["slots"] + 1
    more = summary["slots"] + 2
    resumed = ["train", "--slots", str(more), "--resume", "auto", "--out", str(out), "--no-plots", *BASE]
    assert main(resumed) == 0
    assert json.loads((out / "summary.json").read_text())["slots"] == more


def test_ctrl_c_stops_a_dist_run_within_seconds_with_results(tmp_path: Path):
    out = tmp_path / "run"
    args = ["train", "--transport", "dist", "--slots", "100000", "--checkpoint-every", "1"]
    proc = edgemoe(*args, *BASE, "--no-plots", "--out", str(out), start_new_session=True)
    try:
        wait_for(out / "checkpoint.pt", proc)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert took < 10
    assert "Traceback" not in err
    assert "stopped by SIGINT" in err
    check_stopped_run(out)


def test_sigterm_stops_a_run_with_exit_143(tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = ["train", "--slots", "100000", "--checkpoint-every", "1", "--no-plots", "--out", str(out), *BASE]
    stopper = threading.Thread(
        target=lambda: (wait_for(out / "checkpoint.pt"), os.kill(os.getpid(), signal.SIGTERM)), daemon=True
    )
    before = signal.getsignal(signal.SIGTERM)
    stopper.start()
    assert main(args) == 143
    stopper.join()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("edgemoe train: stopped by SIGTERM after slot")
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    check_stopped_run(out)


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path):
    out = tmp_path / "fresh"
    assert main(["train", "--slots", "2", "--resume", "auto", "--out", str(out), "--no-plots", *BASE]) == 0
    assert json.loads((out / "summary.json").read_text())["slots"] == 2


def test_bad_out_paths_are_one_line_errors_and_leave_nothing(tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    for out, words in [(afile, "is a file"), (afile / "sub", "is a file")]:
        assert main(["train", "--slots", "1", "--out", str(out), *BASE]) == 2
        assert words in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anywhere
            assert main(["train", "--slots", "1", "--out", str(locked / "run"), *BASE]) == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    # a start that fails after validation (unknown dataset files) leaves no empty run folder
    out = tmp_path / "never"
    assert main(["train", "--dataset", "svhn", "--data-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert not out.exists()


def test_checkpoint_problems_are_one_line_before_any_worker_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--slots", "2", "--checkpoint-every", "1", "--out", str(out), "--no-plots", *BASE])
        == 0
    )
    good = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    cases = {
        "truncated.pt": (good[:-10], "partial"),
        "flipped.pt": (good[:-1] + bytes([good[-1] ^ 1]), "corrupt"),
        "other.pt": (b"hello", "not an edgemoe checkpoint"),
    }
    dist = ["--transport", "dist"]  # the file is checked before any server process starts
    for name, (raw, words) in cases.items():
        (tmp_path / name).write_bytes(raw)
        args = ["train", "--slots", "3", "--resume", str(tmp_path / name), "--out", str(tmp_path / "r")]
        assert main([*args, *dist, *BASE]) == 2
        err = capsys.readouterr().err
        assert words in err and name in err and err.count("\n") == 1
    args = ["train", "--slots", "3", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path / "r")]
    assert main([*args, *BASE, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "seed" in err
    assert not (tmp_path / "r").exists()


def test_stale_temp_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".checkpoint.pt.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--slots", "1", "--out", str(out), "--no-plots", *BASE]) == 0
    assert not stale.exists()


def test_checkpoints_keep_a_constant_size_and_history_survives_a_torn_trace(tmp_path):
    from edgemoe.train.checkpoint import TraceLog
    from edgemoe.train.config import train_config_from_dict
    from edgemoe.train.data import load_dataset
    from edgemoe.train.trainer import Trainer

    data = load_dataset("digits", train_subset=100, test_subset=20)
    cfg = {
        "slots": 30,
        "eval_every": 5,
        "scale": 0.05,
        "model": {"dim": 16, "expert_hidden": 16, "channels": 4},
        "network": {
            "servers": [
                {"f_max": 1e9, "cycles_per_token": 1e6, "kappa": 1e-28, "energy_budget": 0.5, "count": 3}
            ]
        },
    }
    tr = Trainer(train_config_from_dict(cfg), dataset=data)
    path = tmp_path / "checkpoint.pt"
    sizes = []
    for end in (5, 10, 30):
        tr.run(end)
        tr.save(path)
        sizes.append(path.stat().st_size)
    assert max(sizes) < 1.2 * min(sizes)  # the in-flight token table varies a little; no history in it
    trace = TraceLog.path_for(path)
    assert trace.stat().st_size > 0
    # a save that crashed after appending to the trace, plus a torn tail: cut back to the checkpoint
    tr.run(31)
    tr.trace.save(path, {k: getattr(tr, k) for k in tr.trace.keys})
    with trace.open("ab") as fh:
        fh.write(b"\x00\x00\x00\x00\x00\x01\x00\x00torn")
    fresh = Trainer(train_config_from_dict(cfg), dataset=data)
    fresh.resume(path)
    assert (
        repr(fresh.history) == repr(tr.history[:30]) and fresh.evals == tr.evals[: len(fresh.evals)]
    )  # NaN loss rows
    assert len(fresh.recorded) == 30
    trace.unlink()
    with pytest.raises(Exception, match="trace file .* missing or short"):
        Trainer(train_config_from_dict(cfg), dataset=data).resume(path)


def test_resume_brings_servers_lost_to_the_transport_back(tmp_path):
    from edgemoe.train.config import train_config_from_dict
    from edgemoe.train.data import load_dataset
    from edgemoe.train.trainer import Trainer

    data = load_dataset("digits", train_subset=100, test_subset=20)
    cfg = train_config_from_dict(
        {
            "slots": 8,
            "scale": 0.05,
            "model": {"dim": 16, "expert_hidden": 16, "channels": 4},
            "faults": [{"server": 1, "slot": 1, "kind": "slow", "stall_s": 0.3}],
            "transport": {"deadline": 0.15, "max_misses": 1, "rejoin_after": 100},
        }
    )
    tr = Trainer(cfg, dataset=data)
    tr.run(3)
    assert not tr.state.online_E[1] and tr.lost == {1: 101}  # would stay away for 100 slots
    tr.save(tmp_path / "checkpoint.pt")
    fresh = Trainer(cfg, dataset=data)
    fresh.resume(tmp_path / "checkpoint.pt")
    fresh.run(4)
    assert fresh.state.online_E[1] and fresh.events[-1] == {"slot": 3, "server": 1, "event": "rejoined"}


def test_a_job_restarted_by_torchrun_resumes_in_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    args = ["train", "--checkpoint-every", "1", "--no-plots", *BASE]
    assert main([*args, "--slots", "2"]) == 0
    rows = (tmp_path / "runs" / "train-job7" / "slots.csv").read_text().splitlines()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets after a failure
    assert main([*args, "--slots", "3"]) == 0
    again = (tmp_path / "runs" / "train-job7" / "slots.csv").read_text().splitlines()
    assert again[:3] == rows  # the first two slots (wall times included) come from the checkpoint
    summary = json.loads((tmp_path / "runs" / "train-job7" / "summary.json").read_text())
    assert summary["slots"] == 3 and len(list((tmp_path / "runs").iterdir())) == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert main([*args, "--slots", "3"]) == 2  # no run id: the restarted job must be told --out


def test_a_signal_while_waiting_for_servers_stops_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--transport", "dist", "--local-servers", "none", "--out", str(out), *BASE]
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    timer.start()
    assert main(args) == 143  # nobody will connect: without the signal this waits transport.timeout_s
    assert time.monotonic() - start < 10
    assert "stopped while waiting for servers [0, 1, 2]" in capsys.readouterr().err
    assert not out.exists()
