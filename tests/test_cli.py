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


def test_no_mlx_backend_is_one_line_with_the_fix(tmp_path):
    """Linux without mlx[cpu] or mlx[cuda]: `mlx.core` does not import; the command says which extra to install."""
    code = ("import sys\nsys.modules['mlx.core'] = None  # as when no backend wheel is installed\n"
            f"from mlx_linear.cli import main\nsys.argv = ['mlx_linear', 'convert', '-o', {str(tmp_path / 'out')!r}]\nmain()")
    result = python(code)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: MLX has no backend installed here: pip install 'mlx-linear[cpu]' (any Linux machine) "
        "or 'mlx-linear[cuda]' (an NVIDIA GPU), one of the two"]
    assert not (tmp_path / "out").exists()
