"""The command line starts fast and quiet: --help and --version load no ML library."""

import subprocess
import sys

import pytest

from mlx_linear.cli import COMMANDS, cli

HEAVY = ("mlx.core", "mlx_lm", "transformers", "huggingface_hub", "pyarrow")


def python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_import_no_ml_library(option):
    code = (
        "import sys\nfrom mlx_linear.cli import cli\n"
        f"try:\n    cli(['{option}'], prog_name='mlx_linear')\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', *[m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "loaded:"
    assert ("Commands:" in result.stdout) == (option == "--help")


def test_the_listed_summaries_are_the_commands_first_help_lines():
    for name, (_, summary) in COMMANDS.items():
        assert cli.get_command(None, name).help.split("\n\n")[0] == summary, name


def test_transformers_says_nothing_about_pytorch():
    result = python("import mlx_linear, transformers")
    assert result.returncode == 0 and "PyTorch" not in result.stderr, result.stderr
