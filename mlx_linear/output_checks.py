"""Outputs checked before the work: writable, with room, and replacing only an earlier output."""

import errno
import json
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def existing_ancestor(path: Path) -> Path:
    """The nearest folder (or file) on the way to `path` that exists."""
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(path) -> Path:
    """The absolute `path`, once a file can be created where it (or its temporary twin) goes."""
    path = Path(path).expanduser().resolve()
    where = existing_ancestor(path if path.is_dir() else path.parent)
    if not where.is_dir():
        raise UserError(f"cannot write {path}: {where} is a file, not a folder: choose another -o")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {where} is not writable ({e.strerror}): choose another -o") from None
    return path


def check_free_space(path: Path, nbytes: int):
    """Refuse before writing `nbytes` where fewer are free (the disk would fill part-way)."""
    free = shutil.disk_usage(existing_ancestor(Path(path).parent)).free
    if nbytes > free:
        raise UserError(
            f"cannot write {path}: it needs {nbytes / 1e9:.2f} GB and the disk has {free / 1e9:.2f} GB free: "
            "free some space or choose another -o"
        )


def disk_full_error(path, error: OSError, fix="free some space or choose another -o") -> UserError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"the disk filled up while writing {path}: {fix}")
    return UserError(f"cannot write {path} ({error.strerror}): {fix}")


MARK = "mlx_linear_version"  # in the config.json of every folder convert and fuse write


def is_earlier_output(path: Path) -> bool:
    """A folder this tool wrote: its config.json carries the mark (or, before the mark, a linearization)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (MARK in config or "linearization" in config)


def check_replaceable(path: Path, force: bool, sources=()):
    """`--force` replaces an empty folder or an earlier output, never other files or a source."""
    if not path.exists():
        return
    if not force:
        raise UserError(f"{path} already exists: pass --force to replace it, or choose another -o")
    for source in sources:  # a hub id names no local path
        if source is not None and Path(source).exists() and path in (Path(source).resolve(), *Path(source).resolve().parents):
            raise UserError(f"-o {path} would replace the source {source}: choose another -o")
    if path.is_dir() and (not any(path.iterdir()) or is_earlier_output(path)):
        return
    raise UserError(f"{path} holds files that are not a converted model: --force replaces only those; choose another -o")


def sweep_partials(path: Path):
    """Remove what an earlier run killed mid-write (SIGKILL, power loss) left beside `path`."""
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(path.with_name(f".{path.name}.old"), ignore_errors=True)


def prepare_model_output(output, force, sources=()) -> Path:
    """Every check a model folder's output passes before any reading or building."""
    path = check_writable(output)
    check_replaceable(path, force, sources)
    sweep_partials(path)
    return path
