"""Every Python package in the tree is declared in pyproject.toml (else a wheel lacks it)."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # requires-python is 3.10: tomllib came with 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: ROOT / config["package-dir"].get(package, package.replace(".", "/")) for package in config["packages"]}
    declared = {path.resolve() for path in folders.values()}
    on_disk = {init.parent.resolve() for top in ("mlx_linear", "convert", "chat", "Metal") for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk == declared, sorted(str(p.relative_to(ROOT)) for p in on_disk ^ declared)
