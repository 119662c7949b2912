"""Where the evaluation data comes from (a local folder, else the Hugging Face hub), and readers
that name the file and line of a bad record."""

import os
from pathlib import Path

from ..errors import UserError
from ..files import read_records

ENV = "MLX_LINEAR_DATA"
HINT = f"pass --data-dir DIR or set {ENV} (formats: docs/evaluation.md)"


def data_dir(path=None):
    """The local data folder (--data-dir, else $MLX_LINEAR_DATA), or None: tasks read the hub's copy."""
    path = path if path is not None else os.environ.get(ENV) or None
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"evaluation data folder {path} does not exist: {HINT}")
    return path


def data_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise UserError(f"{path} is missing: put the task's data there, or {HINT}")
    return path


def require_fields(path, records, fields):
    for number, record in enumerate(records, 1):
        missing = [k for k in fields if k not in record]
        if missing:
            raise UserError(f"{path}: record {number} lacks field {missing[0]!r}: fix or remove it")
    return records


def read_jsonl(path: Path, fields=()):
    """The records of a JSONL file; a malformed line or a record without a field names its number."""
    return require_fields(path, read_records(path), fields)


def read_table(path: Path, fields=()):
    """The rows of a hub data file: parquet (pyarrow) or JSONL."""
    if Path(path).suffix != ".parquet":
        return read_jsonl(path, fields)
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"{path} is not a readable parquet file ({e}): delete it from the HF cache to fetch it again") from e
    return require_fields(path, rows, fields)


def read_labels(path: Path):
    """One integer per line (PIQA's .lst files)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                yield int(line)
            except ValueError:
                raise UserError(f"{path}:{number}: expected an integer label, got {line.strip()!r}") from None
