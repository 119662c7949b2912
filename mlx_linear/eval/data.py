"""Where the evaluation data lives, and readers that name the file and line of a bad record."""

import os
from pathlib import Path

from mlx_linear.errors import UserError
from mlx_linear.train.data import read_records

ENV = "MLX_LINEAR_DATA"
HINT = f"pass --data-dir DIR or set {ENV} (formats: ../shared/data/README.md)"


def project_root(start: Path):
    """The nearest folder at or above `start` holding pyproject.toml, or None."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return None


def default_data_dir() -> Path:
    """../shared/data beside the project root: found from the package (editable install), else the cwd."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        root = project_root(start)
        if root is not None and (root.parent / "shared" / "data").is_dir():
            return root.parent / "shared" / "data"
    raise UserError(f"no evaluation data found (looked for ../shared/data beside the project root): {HINT}")


def data_dir(path=None) -> Path:
    path = Path(path) if path is not None else default_data_dir()
    if not path.is_dir():
        raise UserError(f"evaluation data folder {path} does not exist: {HINT}")
    return path


def data_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise UserError(f"{path} is missing: put the task's data there, or {HINT}")
    return path


def read_jsonl(path: Path, fields=()):
    """The records of a JSONL file; a malformed line or a record without a field names its number."""
    records = read_records(path)
    for number, record in enumerate(records, 1):
        missing = [k for k in fields if k not in record]
        if missing:
            raise UserError(f"{path}: record {number} lacks field {missing[0]!r}: fix or remove it")
    return records


def read_labels(path: Path):
    """One integer per line (PIQA's .lst files)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                yield int(line)
            except ValueError:
                raise UserError(f"{path}:{number}: expected an integer label, got {line.strip()!r}") from None
