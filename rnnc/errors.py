"""The one error type users see: `FILE:LINE:COL: error: MESSAGE`, the source line and a caret."""
from __future__ import annotations


class RnncError(Exception):
    """A user-facing error in a spec, a compile request or a call of a compiled module.

    `line`/`col` are 1-based and refer to `source` (the spec text) when known.
    `str(err)` is the full formatted message, so a plain `print(err)` is what users want.
    """

    def __init__(self, message: str, *, line: int | None = None, col: int | None = None,
                 source: str | None = None, filename: str | None = None):
        self.message = message
        self.line = line
        self.col = col
        self.source = source
        self.filename = filename or "<spec>"
        super().__init__(self.format())

    def located(self, source: str | None, filename: str | None) -> "RnncError":
        """The same error with the spec text and file name attached (set once, by compile/check)."""
        if self.source is None and source is not None:
            self.source = source
        if filename and self.filename == "<spec>":
            self.filename = filename
        self.args = (self.format(),)
        return self

    def format(self) -> str:
        if self.line is None:
            return f"{self.filename}: error: {self.message}"
        col = self.col or 1
        head = f"{self.filename}:{self.line}:{col}: error: {self.message}"
        if not self.source:
            return head
        lines = self.source.split("\n")  # as the lexer counts lines (not str.splitlines)
        if not 1 <= self.line <= len(lines):
            return head
        text = lines[self.line - 1].rstrip("\r").replace("\t", " ")
        return f"{head}\n    {text}\n    {' ' * (col - 1)}^"

    def __str__(self) -> str:
        return self.format()


def fail(message: str, pos=None) -> "None":
    """Raise an RnncError at `pos`, any object with `.line` and `.col` (or None)."""
    line = getattr(pos, "line", None)
    col = getattr(pos, "col", None)
    raise RnncError(message, line=line, col=col)
