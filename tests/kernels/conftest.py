"""Kernel tests run Triton kernels in its CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported, which a conftest does before any test module is collected."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
