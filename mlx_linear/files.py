"""Outputs that appear only when complete (written beside the target, then renamed into place)
with the permissions a plain write would give, and JSONL records read with their line numbers."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` (same suffix: writers pick the format by it); it
    replaces `path` when the block completes and is removed when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o666 & ~umask())  # mkstemp makes the file private (0600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_safetensors(path, arrays, metadata=None):
    import mlx.core as mx  # here: reading records must not load MLX

    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata)


@contextlib.contextmanager
def atomic_output(path, force=False):
    """Yield a temporary folder beside `path`; it becomes `path` only if the block completes."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists: pass --force to replace it, or choose another -o")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def read_records(path: Path) -> list:
    """JSON objects of a .jsonl file (or a .json list), with the line number in any error."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e}): fix the file") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of records: use JSONL, one object a line")
        return records
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}): fix or delete that line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, one a line")
            records.append(record)
    return records


def read_safetensors(path, fix) -> dict:
    """mx.load of a safetensors file; a damaged one is a one-line error naming it and `fix`."""
    import mlx.core as mx  # here, not at the top: the CLI imports this module before any command runs

    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"corrupt weights file {path} ({e}): {fix}") from e
