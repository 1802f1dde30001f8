"""Axis classes of a step's nodes (a library beside the backends, not a backend).

Per-sample axes that must have the same size and index the same entries are one class:
union-find over the graph (an elementwise op's operands, an einsum's letters, a select's
kept axes, a state's read and write). A class is *parallel* when no node sums, reduces,
picks or mixes along it, so that entries of different indices never meet: the Triton code
generator gives each block of such a class its own program, and the newton backend reads
from it that the step's Jacobian is block-diagonal over it.

Entry point: `axis_classes(rec, nodes) -> (cls, size, parallel)`: cls maps (node, axis) to a
class id (literal size-1 axes have none), size maps a class to its sympy size, parallel is
the set of parallel class ids.
"""
from __future__ import annotations

from rnnc import ir


class UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def unit(s) -> bool:
    return s.is_Integer and int(s) == 1


def _union_axes(rec, nodes: set):
    """Union-find of per-sample axes over the kernel's nodes; classes that are not parallel."""
    uf = UnionFind()
    shape = lambda i: rec.attr(i, "shape")  # noqa: E731
    mixed = set()  # (node, axis) keys whose class must not be parallel
    for i in sorted(nodes):
        node = rec.node(i)
        for k, s in enumerate(shape(i)):
            uf.find((i, k))
        if isinstance(node, ir.Elementwise):
            for a in node.args:
                for k, s in enumerate(shape(a)):
                    if not unit(s) and k < len(shape(i)):
                        uf.union((a, k), (i, k))
        elif isinstance(node, ir.Contract):
            letters = {}
            for a, sub in zip(node.args, node.subscripts):
                for k, ch in enumerate(sub):
                    if unit(shape(a)[k]):
                        continue
                    letters.setdefault(ch, []).append((a, k))
                    if ch not in node.out:
                        mixed.add((a, k))
            for k, ch in enumerate(node.out):
                letters.setdefault(ch, []).append((i, k))
            for keys in letters.values():
                keys = [x for x in keys if not unit(shape(x[0])[x[1]])]
                for x in keys[1:]:
                    uf.union(keys[0], x)
        elif isinstance(node, ir.Reduce):
            kept = [k for k in range(len(shape(node.arg))) if k not in node.axes]
            for j, k in enumerate(kept):
                if not unit(shape(node.arg)[k]):
                    uf.union((node.arg, k), (i, j))
            mixed |= {(node.arg, k) for k in node.axes}
        elif isinstance(node, ir.Select):
            seen = {}
            for k, v in enumerate(node.index):
                if isinstance(v, int):
                    mixed.add((node.arg, k))
                elif v in seen:
                    mixed |= {(node.arg, k), (node.arg, seen[v])}
                    uf.union((node.arg, k), (node.arg, seen[v]))
                else:
                    seen[v] = k
            for j, v in enumerate(node.out):
                if v is not None and not unit(shape(i)[j]):
                    uf.union((node.arg, seen[v]), (i, j))
        elif isinstance(node, ir.Broadcast):
            for k, s in enumerate(shape(node.arg)):
                if not unit(s):
                    uf.union((node.arg, k), (i, k))
        elif isinstance(node, (ir.StateWrite, ir.Output)):
            for k, s in enumerate(shape(node.arg)):
                if not unit(s):
                    uf.union((node.arg, k), (i, k))
    for st in rec.states:
        if st.write is not None and st.write in nodes:
            for k, s in enumerate(st.shape):
                if not unit(s):
                    uf.union((st.read, k), (st.write, k))
    return uf, mixed


def axis_classes(rec, nodes) -> tuple:
    """(cls, size, parallel) for the nodes' axes (see the module docstring)."""
    uf, mixed = _union_axes(rec, nodes)
    ids, cls, size = {}, {}, {}
    for key in sorted(uf.parent, key=lambda x: (x[0], x[1])):
        if key[0] not in nodes:
            continue
        s = rec.attr(key[0], "shape")[key[1]]
        if unit(s):
            continue
        root = uf.find(key)
        c = ids.setdefault(root, len(ids))
        cls[key] = c
        size.setdefault(c, s)
    bad = {cls[k] for k in mixed if k in cls}
    for i in nodes:  # two axes of one value in one class (U[i,j] with h[j] -> h[i]): mixing
        seen = set()
        for k, s in enumerate(rec.attr(i, "shape")):
            if (i, k) in cls:
                if cls[(i, k)] in seen:
                    bad.add(cls[(i, k)])
                seen.add(cls[(i, k)])
    return cls, size, set(size) - bad
