"""Stage 3: what the IR says about parallelism. Entry point: `analyse`.

For now: the dependence partition. Hoisted work depends on no state read and runs for all
T at once before the recurrence; the recurrent core is everything a state read reaches.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from . import ir


@dataclass(frozen=True)
class Analysis:
    hoisted: frozenset   # node ids computed outside the time loop
    core: tuple          # node ids computed once per step, in order
    hoisted_names: tuple  # statements whose value is hoisted


def partition(rec: ir.Recurrence) -> tuple:
    """(hoisted node ids, core node ids in order). Writes the `hoisted` node attribute."""
    core = set()
    for st in rec.states:
        core.add(st.read)
        core |= nx.descendants(rec.graph, st.read)
    hoisted = frozenset(i for i in rec.graph.nodes if i not in core)
    for i in rec.graph.nodes:
        rec.graph.nodes[i]["hoisted"] = i in hoisted
    return hoisted, tuple(i for i in rec.order() if i in core)


def analyse(rec: ir.Recurrence) -> Analysis:
    hoisted, core = partition(rec)
    names = []
    for label, _pos, node in rec.statements:
        if node in hoisted and label not in names:
            names.append(label)
    return Analysis(hoisted, core, tuple(names))
