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
