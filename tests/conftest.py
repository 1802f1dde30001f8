"""Test-session set-up.

Triton's CPU interpreter must be chosen before `triton` is first imported (its interpreter
patches Triton's modules then), so it is set here, ahead of every test module: the Triton
backend's tests run its generated kernels on the CPU. Tests that need a compiled (not
interpreted) kernel unset it for the kernels they decorate.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
