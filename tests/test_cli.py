import subprocess
import sys

from edgemoe.cli import build_parser, main


def test_help_lists_commands(capsys):
    parser = build_parser()
    text = parser.format_help()
    assert "edgemoe" in text
    assert main([]) == 1


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "edgemoe", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "edgemoe" in out.stdout


def test_threads_below_one_is_a_one_line_error_for_every_command(capsys, tmp_path):
    for command in ("train", "profile", "demo"):
        for value in ("0", "-2"):
            assert main([command, "--threads", value, "--out", str(tmp_path / "r")]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "--threads" in err and ">= 1" in err
    assert not (tmp_path / "r").exists()
