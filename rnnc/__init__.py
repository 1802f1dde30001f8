"""rnnc: a compiler for recurrent neural architectures.

    m = rnnc.compile("examples/gla.rnn", backend="auto", H=4, K=16, V=16)

`compile` reads as the pipeline: parse, check, analyse, plan, lower.
"""
from __future__ import annotations

from .compiler import compile, load
from .errors import RnncError
from .random_spec import random_spec
from . import builder, layers  # noqa: F401  (rnnc.builder: specs from Python; rnnc.layers: composition)

__all__ = ["compile", "load", "RnncError", "random_spec"]
__version__ = "0.1.0"
