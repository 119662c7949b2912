"""Execute Metal kernel sources on the CPU (see emulator.py and README.md)."""

from .emulator import KernelError, compiler, metal_kernel  # noqa: F401
