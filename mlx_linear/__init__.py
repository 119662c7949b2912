"""mlx-linear: pretrained transformer LLMs as constant-memory linear-attention RNNs on MLX."""

from ._blas import LOADED as BLAS  # noqa: F401  (must run before mlx is imported)
from .utils import load  # noqa: E402,F401

__version__ = "0.1.0"
