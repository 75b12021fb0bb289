"""One edit every graph pass ends with: the graph's node list replaced, and the initializers nothing
reads any more (a weight folded into another form, a scale of a removed node) dropped, so a bundle
carries no dead bytes."""

from __future__ import annotations

import onnx


def set_nodes(g: onnx.GraphProto, nodes, new_initializers=()) -> None:
    """``g``'s nodes become ``nodes`` (in that order), ``new_initializers`` are added, and every
    initializer no node or graph output reads is removed."""
    nodes = list(nodes)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_initializers)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [t for t in g.initializer if t.name in used]
    if len(live) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(live)
