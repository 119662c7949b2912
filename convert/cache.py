"""The bundled SmolLM2 converted once into the user's cache folder, reused after."""

import hashlib
import json
import os
from pathlib import Path

from mlx_linear import __version__

from .convert import convert


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_LINEAR_CACHE", Path.home() / ".cache" / "mlx-linear"))


def cache_key(method, conversion) -> str:
    """The folder name: the method, the `convert` options and the package version (a release
    that converts differently must not reuse an older conversion)."""
    digest = hashlib.sha256(json.dumps({"version": __version__, **conversion}, sort_keys=True).encode())
    return f"smollm2-135m-instruct-{method}-{digest.hexdigest()[:10]}"


def bundled_model(method="liger-gla", log=print, **conversion) -> Path:
    """The bundled SmolLM2 converted with `method` (and `convert` keyword options such as
    sinks or options)."""
    path = cache_dir() / cache_key(method, conversion)
    if not (path / "config.json").is_file():
        log(f"converting the bundled SmolLM2-135M-Instruct ({method}) into {path}, once")
        convert(path, method=method, force=True, log=log, **conversion)
    return path
