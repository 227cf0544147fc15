"""The command-line entry point itself (each command's own tests sit beside this file)."""
import subprocess
import sys

from pysonic.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "pysonic 0.1.0" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: pysonic" in capsys.readouterr().out


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "pysonic", "--help"], capture_output=True, text=True, check=True)
    assert "usage: pysonic" in out.stdout
