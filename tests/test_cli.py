import subprocess
import sys

from typer.testing import CliRunner

from maskdit.cli import app


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "version" in result.output


def test_console_script_runs():
    exe = subprocess.run([sys.executable, "-c", "from maskdit.cli import app; app(['version'])"],
                         capture_output=True, text=True)
    assert exe.returncode == 0, exe.stderr
    assert exe.stdout.strip() == __import__("maskdit").__version__
