"""Kernel tests run Triton kernels in its CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported (`@triton.jit` picks the interpreter when a kernel is defined,
Triton's own `tl.sum` & co. at import), which this conftest does before its test modules are
collected. A test module collected earlier that imports triton (vllm imports it) breaks
that; it is caught here, by name, rather than as kernels failing with "Cannot call
@triton.jit'd outside of the scope of a kernel"."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

if "triton.language" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
    from triton.language import standard

    if type(standard.sum).__name__ != "InterpretedFunction":
        raise RuntimeError("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1 (by a test "
                           "module collected earlier, e.g. one importing vllm at module level): the kernel tests "
                           "cannot run under the interpreter; import it lazily there")
