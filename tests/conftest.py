"""Test-session set-up.

Triton's CPU interpreter must be chosen before `triton` is first imported (its interpreter
patches Triton's modules then), so it is set here, ahead of every test module: the Triton
backend's tests run its generated kernels on the CPU. Tests that need a compiled (not
interpreted) kernel unset it for the kernels they decorate.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402



def _patch_language_once_per_name():
    """Triton's interpreter re-patches triton.language at every call of a jitted helper
    (interpreter._patch_lang -> _patch_builtin), each time listing every member of each
    language module with inspect.getmembers to find the builtins to wrap. Inside a running
    kernel they are already wrapped, so the listing finds nothing to do, but it was ~15% of
    an interpreted chunk kernel's time (our kernels call their loaders inside loops). Here the
    builtins' names are listed once per module and each call checks just those names, wrapping
    what is still a builtin exactly as Triton does. Skipped where this Triton lacks the
    functions (the tests then run as slowly as before, and as correctly)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if not all(callable(getattr(x, n, None)) for x, n in
               ((ti, "_patch_builtin"), (ti, "_patch_attr"), (tl.core, "is_builtin"))):
        return
    names = {}

    def patch_builtin(pkg, builder, scope):
        if id(pkg) not in names:
            found = [n for n, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
            if not found:      # already wrapped: nothing to list yet, nothing to do
                return
            names[id(pkg)] = (pkg, found)   # pkg kept: its id stays its own
        for n in names[id(pkg)][1]:
            member = getattr(pkg, n, None)
            if tl.core.is_builtin(member):
                ti._patch_attr(pkg, n, member, builder, scope)
    ti._patch_builtin = patch_builtin


_patch_language_once_per_name()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (`-n auto`): a second intra-op thread per worker would only wait for
    # a core the other worker holds (see one_thread below).
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures(...)`),
    restored after it. The tensors in these tests are tiny: threads only add hand-offs, and on
    a loaded 2-core machine they made gradcheck 20x and the chunk kernels ~100x slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
