"""The README and docs/ pages: every relative link (and its #anchor) leads somewhere, and every
command they show names a bench script or `mlx_linear` subcommand that exists, with options it takes."""

import re
import shlex
from pathlib import Path

import pytest

from mlx_linear.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```[a-z]*\n(.*?)```|`([^`]+)`", re.S)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def commands(page):
    """Every command a page shows (code spans and blocks), split at && ; |, comments dropped."""
    for block, span in CODE.findall(page.read_text()):
        # a block's lines continued with a backslash, a span wrapped across lines: one command each
        for line in block.replace("\\\n", " ").splitlines() if block else [span.replace("\n", " ")]:
            for part in re.split(r"&&|;|\|", line.split(" # ")[0]):
                words = part.strip().split()
                if words[:1] in (["python"], ["python3"], ["bash"]) and len(words) > 1 and words[1].startswith("bench/"):
                    yield words[1], words[2:]
                elif words[:1] == ["mlx_linear"] and len(words) > 1:
                    yield f"mlx_linear {words[1]}", words[2:]


def options(words):
    return [w.split("=")[0] for w in words if w.startswith("--")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_lead_somewhere(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue  # the web: not reachable from here
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_exist_with_their_options(page):
    shown = list(commands(page))
    for name, words in shown:
        if name.startswith("bench/"):
            script = ROOT / name
            assert script.is_file(), f"{page.name}: {name} does not exist"
            source = script.read_text()
            for option in options(words):
                assert f'"{option}"' in source, f"{page.name}: {name} has no option {option}"
        else:
            subcommand = name.split()[1]
            assert subcommand in COMMANDS, f"{page.name}: no command `{name}`"
            command = cli.get_command(None, subcommand)
            known = {o for p in command.params for o in p.opts + p.secondary_opts} | {"--help"}
            for option in options(words):
                assert option in known or passed_on(subcommand, option), f"{page.name}: `{name}` has no option {option}"


def passed_on(subcommand, option):
    """`serve` hands the options it does not know to mlx_lm.server: an option of that server's."""
    import mlx_lm.server

    return subcommand == "serve" and f'"{option}"' in Path(mlx_lm.server.__file__).read_text()


def test_the_pages_show_commands_and_the_readme_is_short():
    assert sum(1 for page in PAGES for _ in commands(page)) > 50
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    shlex.split((ROOT / "README.md").read_text().split("```bash")[1].split("```")[0], comments=True)  # the quick start parses
