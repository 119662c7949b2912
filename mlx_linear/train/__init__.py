"""LoRA uptraining of linearized models (`mlx_linear lora-train`, `mlx_linear fuse`)."""

from .data import Source, load_source  # noqa: F401
from .trainer import TrainConfig, train  # noqa: F401
