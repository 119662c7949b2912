"""Conversion of HF and GGUF checkpoints into linearized MLX models."""

from .bundled import bundled_gguf  # noqa: F401
from .cache import bundled_model  # noqa: F401
from .convert import convert  # noqa: F401
