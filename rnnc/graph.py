"""Draw the IR as Graphviz DOT: hoisted work in blue, the recurrent core in orange."""
from __future__ import annotations

import shutil
import subprocess

from . import ir
from .analysis import partition
from .errors import RnncError


def _label(rec, i) -> str:
    node = rec.node(i)
    shape = ir.shape_str(rec.attr(i, "shape"))
    if isinstance(node, (ir.Input, ir.Param, ir.StateRead)):
        head = f"{type(node).__name__.lower()} {node.name}"
    elif isinstance(node, (ir.StateWrite, ir.Output)):
        head = f"{'state' if isinstance(node, ir.StateWrite) else 'output'} {node.name} ←"
    elif isinstance(node, ir.Const):
        head = f"{node.value:g}"
    elif isinstance(node, ir.Elementwise):
        head = node.op.value
    elif isinstance(node, ir.Contract):
        head = f"einsum {','.join(node.subscripts)}->{node.out}"
    elif isinstance(node, ir.Reduce):
        head = f"{'sum' if node.op is ir.Op.ADD else 'max'} axes {list(node.axes)}"
    elif isinstance(node, ir.Select):
        head = f"select {list(node.index)}→{list(node.out)}"
    else:
        head = type(node).__name__.lower()
    label = rec.attr(i, "label")
    text = f"{label} = {head}" if label and not hasattr(node, "name") else head
    return f"{text}\\n{shape}".replace('"', "'")


def to_dot(rec: ir.Recurrence) -> str:
    hoisted, _ = partition(rec)
    lines = [f'digraph "{rec.name}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  label="rnn ' + rec.name + ': blue = hoisted (all T at once), orange = recurrent core";']
    for i in rec.order():
        node = rec.node(i)
        color = "#cfe2ff" if i in hoisted else "#ffd8a8"
        if isinstance(node, (ir.StateRead, ir.StateWrite)):
            color = "#ff9f43"
        lines.append(f'  n{i} [label="{_label(rec, i)}", fillcolor="{color}"];')
    for a, b in rec.graph.edges:
        lines.append(f"  n{a} -> n{b};")
    for st in rec.states:
        if st.write is not None:
            lines.append(f'  n{st.write} -> n{st.read} [style=dashed, constraint=false, label="next step"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot: str, path: str, fmt: str) -> None:
    exe = shutil.which("dot")
    if exe is None:
        raise RnncError(f"graphviz's `dot` is not installed; write {path.rsplit('.', 1)[0]}.dot instead")
    res = subprocess.run([exe, f"-T{fmt}", "-o", path], input=dot.encode(), capture_output=True)
    if res.returncode != 0:
        raise RnncError(f"graphviz failed: {res.stderr.decode(errors='replace').strip()}")
