"""Edge-level attribution: component graphs, exact edge patching, EAP / RelP edge scores."""
from .graph import ComponentGraph, build_graph
from .patching import GraphRun, graph_forward

__all__ = ["ComponentGraph", "build_graph", "GraphRun", "graph_forward"]
