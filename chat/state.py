"""Conversation state files: the model's cache (recurrent states, window, token count) as
mlx-lm prompt-cache safetensors, with the model's fingerprint and a checksum in the metadata."""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from mlx_linear.errors import UserError
from mlx_linear.files import atomic_file

FORMAT = "mlx-linear-chat-state/1"
SUFFIX = ".safetensors"  # mx.load tells formats by it


def state_path(path) -> Path:
    path = Path(path).expanduser()
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def checksum(cache, fields) -> str:
    """sha256 over the cache's arrays and scalars and the other metadata fields."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for _, x in tree_flatten([c.state for c in cache]):
        digest.update(memoryview(mx.contiguous(x)) if isinstance(x, mx.array) else repr(x).encode())
    return digest.hexdigest()


def save_state(path, cache, model_id, **fields):
    """Write atomically: a temporary file beside `path`, renamed when complete."""
    path = state_path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"cannot write {path}: give a file name in an existing folder")
    mx.eval([c.state for c in cache])
    fields = {"format": FORMAT, "model": model_id, **fields}
    metadata = {**fields, "checksum": checksum(cache, fields)}
    with atomic_file(path) as tmp:
        save_prompt_cache(str(tmp), cache, metadata)
    return path


def load_state(path, model_id):
    """(cache, metadata); a one-line UserError when the file is missing, corrupt or for another model."""
    path = state_path(path)
    if not path.is_file():
        raise UserError(f"no state file {path}: check the name (/save FILE writes one)")
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): check the file and its permissions") from e
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # what mx.load and the cache classes raise on damage
        raise UserError(f"{path} is not a readable chat state ({type(e).__name__}: {e}): it is corrupt; save it again") from e
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a chat state file (format {metadata.get('format')!r}): use a file /save wrote")
    if metadata.get("model") != model_id:
        raise UserError(f"{path} was saved with another model ({metadata.get('name', '?')}): chat with that --model to load it")
    fields = {k: v for k, v in metadata.items() if k != "checksum"}
    if metadata.get("checksum") != checksum(cache, fields):
        raise UserError(f"{path} is corrupt (checksum mismatch): save the conversation again")
    return cache, metadata
