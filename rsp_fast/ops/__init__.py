"""Kernel dispatch and the custom-operator wrappers."""
from .dispatch import KernelSet, backends, select_kernels

__all__ = ["KernelSet", "backends", "select_kernels"]
