"""mlx-linear: pretrained transformer LLMs as constant-memory linear-attention RNNs on MLX."""

import os

# transformers says "PyTorch was not found" on import: MLX needs no torch (mlx-lm sets this too,
# but only once it is imported itself).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from ._blas import LOADED as BLAS  # noqa: E402,F401  (must run before mlx is imported)

__version__ = "0.1.0"


def __getattr__(name):
    """`mlx_linear.load` imports MLX, mlx-lm and transformers on first use: the command line
    answers --help and --version without them."""
    if name == "load":
        from .utils import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
