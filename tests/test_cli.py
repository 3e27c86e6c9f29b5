import subprocess
import sys

from videomoco import __version__
from videomoco.cli import COMMANDS, main


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "videomoco", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"videomoco {__version__}"


def test_help_lists_every_command(capsys):
    assert main([]) == 1
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in text
