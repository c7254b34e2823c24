"""Small edits of an ONNX graph shared by the exporters (no torch here: the driver uses them)."""

from __future__ import annotations


def drop_unused_nodes(graph) -> None:  # noqa: ANN001 - an onnx.GraphProto
    """Remove nodes none of whose outputs reach a graph output (a folded pad's subgraph, the
    bounds of a clip that the quantizer folded into its ranges)."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))


def drop_unused_initializers(graph) -> None:  # noqa: ANN001 - an onnx.GraphProto
    """Remove the initializers no node reads: ONNX Runtime warns about each one every time a
    session loads the model."""
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    initializers = [init for init in graph.initializer if init.name in read]
    if len(initializers) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(initializers)
