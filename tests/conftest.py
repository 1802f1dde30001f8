"""Test-session set-up.

Triton's CPU interpreter must be chosen before `triton` is first imported (its interpreter
patches Triton's modules then), so it is set here, ahead of every test module: the Triton
backend's tests run its generated kernels on the CPU. Tests that need a compiled (not
interpreted) kernel unset it for the kernels they decorate.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
