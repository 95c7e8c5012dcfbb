"""Edge-level attribution: component graphs, exact edge patching, EAP / RelP edge scores."""
from .graph import ComponentGraph, build_graph
from .patching import GraphRun, graph_forward

__all__ = ["ComponentGraph", "build_graph", "GraphRun", "graph_forward"]
from .scores import METHODS, EdgeScores, edge_scores, exact_edge_scores

__all__ += ["METHODS", "EdgeScores", "edge_scores", "exact_edge_scores"]
from .connected import greedy_circuit, prune_circuit
from .conventions import CONVENTIONS, MIB_FRACTIONS, EdgeConvention, get_convention
from .evaluate import (
    DEFAULT_FRACTIONS,
    FaithfulnessCurve,
    area,
    faithfulness_curve,
    pearson,
    top_edges,
)

__all__ += ["DEFAULT_FRACTIONS", "FaithfulnessCurve", "area", "faithfulness_curve", "pearson", "top_edges"]
__all__ += ["CONVENTIONS", "MIB_FRACTIONS", "EdgeConvention", "get_convention", "greedy_circuit", "prune_circuit"]
