"""``edgemoe train``, ``edgemoe profile`` and the demo runner, end to end on tiny settings."""

from __future__ import annotations

import json

import pytest

from edgemoe.cli import main

TINY = ["--set", "model.dim=16", "--set", "model.expert_hidden=16", "--set", "model.channels=4"]


def test_train_writes_run_folder_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--slots", "4", "--scale", "0.05", "--train-subset", "100", "--test-subset", "40"]
    args += ["--eval-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-plots", *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("throughput_mean", "test_accuracy", "backlog_mean", "energy_over_budget_max", "gc_norm_mean"):
        assert key in summary
    assert summary["trained"] + summary["in_flight"] == summary["arrived"]
    assert (out / "slots.csv").read_text().count("\n") == 5
    assert (out / "scores.npz").is_file() and (out / "checkpoint.pt").is_file()
    assert "stable-moe" in capsys.readouterr().out
    out2 = tmp_path / "resumed"
    resume = [a if a != "4" else "6" for a in args[:3]] + args[3:]
    resume = [*resume[: resume.index("--out") + 1], str(out2), *resume[resume.index("--out") + 2 :]]
    assert main([*resume, "--resume", str(out / "checkpoint.pt")]) == 0
    assert json.loads((out2 / "summary.json").read_text())["slots"] == 6


def test_train_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["train", "--dataset", "imagenet", "--out", str(tmp_path)]) == 2
    assert "data.name" in capsys.readouterr().err
    assert main(["train", "--k", "9", "--out", str(tmp_path)]) == 2
    assert "k:" in capsys.readouterr().err
    missing = tmp_path / "no-such-dir"
    assert main(["train", "--dataset", "svhn", "--data-dir", str(missing), "--out", str(tmp_path)]) == 2
    assert "no-such-dir" in capsys.readouterr().err


def test_profile_reports_every_server(tmp_path):
    out = tmp_path / "prof"
    assert main(["profile", "--tokens", "16", "--repeats", "2", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert len(report["servers"]) == 8
    assert all(s["s_per_token"] > 0 and s["cycles_per_token"] > 0 for s in report["servers"])
    assert "cycles_per_token" in (out / "servers.yaml").read_text()
    # the printed servers.yaml is a valid train config as it stands
    run = tmp_path / "from-profile"
    args = ["train", "--config", str(out / "servers.yaml"), "--slots", "2", "--scale", "0.05"]
    assert (
        main([*args, "--train-subset", "100", "--test-subset", "20", "--out", str(run), "--no-plots", *TINY])
        == 0
    )
    assert (
        json.loads((run / "summary.json").read_text())["config"]["network"]["servers"][0]["cycles_per_token"]
        > 0
    )


@pytest.mark.slow
def test_demo_summary_maps_each_policy(tmp_path, capsys):
    args = ["demo", "--slots", "3", "--scale", "0.05", "--seeds", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["stable-moe", "topk", "jsq-k", "bias-uniform", "bias-capacity", "topk-switch"]
    for metrics in summary.values():
        for key in (
            "throughput_mean",
            "test_accuracy",
            "backlog_mean",
            "energy_over_budget_max",
            "gc_norm_mean",
            "test_accuracy_gate",
            "test_accuracy_random",
            "test_accuracy_zero",
            "mi_train_bits",
            "mi_test_bits",
        ):
            assert isinstance(metrics[key], float)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "comparison.csv").is_file()
    out = capsys.readouterr().out
    assert "stable-moe vs topk" in out and "stable-moe vs bias-capacity" in out and "MI train" in out


def test_rough_edges_are_one_line_errors(tmp_path, capsys):
    def err_of(*args: str) -> str:
        assert main(["train", "--out", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    err = err_of("--router", "foo")
    assert "model.router" in err and "'etr'" in err and "'topk'" in err
    err = err_of("--transport", "grpc")
    assert "transport.kind" in err and "'dist'" in err and "'inproc'" in err
    err = err_of("--train-subset", "10000000")
    assert "data.train_subset" in err and "has 1438" in err
    assert "data.test_subset" in err_of("--test-subset", "3")
    bad = tmp_path / "bad.yaml"
    bad.write_text("slots: [1, 2\n")
    err = err_of("--config", str(bad))
    assert "bad.yaml" in err and "line 2" in err
    assert not (tmp_path / "r").exists()


def test_yaml_exponent_floats_are_numbers(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "network:\n  servers:\n    - {f_max: 1.0e9, cycles_per_token: 1e8, kappa: 1.0e-28, energy_budget: 0.5, count: 3}\n"
    )
    args = ["train", "--config", str(cfg), "--slots", "1", "--scale", "0.05", "--train-subset", "50"]
    assert main([*args, "--test-subset", "40", "--out", str(tmp_path / "r"), "--no-plots", *TINY]) == 0
    assert "measure accuracy only in steps of 2.5 %" in capsys.readouterr().err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["config"]["network"]["servers"][0]["f_max"] == 1e9


def test_torchrun_with_the_wrong_number_of_processes_is_one_line(tmp_path, capsys, monkeypatch):
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "3",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--transport", "dist", "--out", str(tmp_path / "r")]) == 2
    assert "J+1 = 9 processes" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_compare_runs_paired_seeds_and_refuses_bad_flags(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--policies", "stable-moe,jsq-k", "--seeds", "0,1", "--slots", "2", "--scale", "0.05"]
    args += ["--train-subset", "100", "--test-subset", "40", "--eval-every", "2", *TINY, "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["stable-moe", "jsq-k"] and len(summary["jsq-k"]["seeds"]) == 2
    assert "stable-moe vs jsq-k" in capsys.readouterr().out
    for bad, field in ((["--seeds", "0,x"], "--seeds"), (["--seeds", "1,1"], "--seeds"), ([], "--out")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and field in err and "Traceback" not in err
