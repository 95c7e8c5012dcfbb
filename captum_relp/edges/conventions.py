"""How circuits are sized, selected and integrated: the library's convention and MIB's.

Both conventions score the same graph with the same attribution methods; they differ in
how a faithfulness curve is built from the scores (see ``docs/edges.md``):

========================  ==================================  ==================================
aspect                    ``"library"`` (default)             ``"mib"`` (MIB circuit track)
========================  ==================================  ==================================
circuit sizes             0, .001, .002, .005, .01, .02,      .001, .002, .005, .01, .02, .05,
                          .05, .1, .2, .3, .5, .7, .9, 1      .1, .2, .5, 1 (no 0)
edges kept, size ``p``    ``round(p * n)``                    ``int(p * n)`` (floor)
CPR circuits              top ``|score|``                     top signed score
CMD circuits              top ``|score|``                     top ``|score|``
area                      trapezoid over ``[0, 1]``           trapezoid over ``[.001, 1]``
key/value inputs (GQA)    one per key/value head              one per query head (ungrouped)
EAP-IG grid               ``k / m``, ``k = 1 .. m`` (paper)   ``k / m``, ``k = 0 .. m - 1``
========================  ==================================  ==================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple, Union

DEFAULT_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class EdgeConvention:
    """One way of turning edge scores into circuits and CPR / CMD.

    Attributes:
        name: ``"library"`` or ``"mib"``.
        fractions: circuit sizes as fractions of all edges (the integration grid).
        cpr_signed: CPR's circuits keep the largest *signed* scores (MIB); otherwise the
            largest ``|score|``, as CMD's circuits always do.
        size_rule: ``"round"`` (``round(p * n)``) or ``"floor"`` (``int(p * n)``, MIB).
        ungroup_kv: one key/value input per query head (see :func:`~captum_relp.edges.build_graph`).
        ig_grid: EAP-IG's interpolation grid, ``"right"`` or ``"left"`` (see
            :func:`~captum_relp.edges.edge_scores`).

    Example:
        >>> from captum_relp.edges import get_convention
        >>> mib = get_convention("mib")
        >>> mib.circuit_size(0.1, 479), get_convention("library").circuit_size(0.1, 479)
        (47, 48)
    """

    name: str
    fractions: Tuple[float, ...]
    cpr_signed: bool
    size_rule: str
    ungroup_kv: bool
    ig_grid: str

    def circuit_size(self, fraction: float, n_edges: int) -> int:
        """Edges kept at size ``fraction`` of ``n_edges`` (MIB: ``int(fraction * n_edges)``)."""
        if self.size_rule == "floor":
            return int(fraction * n_edges)
        return int(round(fraction * n_edges))

    def as_dict(self) -> Dict[str, object]:
        """JSON-friendly description, recorded in every ``edges_results.json``."""
        out = asdict(self)
        out["fractions"] = list(self.fractions)
        out["cmd_signed"] = False
        out["area"] = f"trapezoid over the fractions {self.fractions[0]} .. {self.fractions[-1]}"
        return out


LIBRARY = EdgeConvention("library", DEFAULT_FRACTIONS, cpr_signed=False, size_rule="round",
                         ungroup_kv=False, ig_grid="right")
MIB = EdgeConvention("mib", MIB_FRACTIONS, cpr_signed=True, size_rule="floor", ungroup_kv=True, ig_grid="left")
CONVENTIONS: Dict[str, EdgeConvention] = {"library": LIBRARY, "mib": MIB}


def get_convention(convention: Union[str, EdgeConvention]) -> EdgeConvention:
    """The convention named ``convention`` (``"library"`` or ``"mib"``), or ``convention`` itself.

    Examples::

        >>> get_convention("mib").fractions[0], get_convention("library").fractions[0]
        (0.001, 0.0)
    """
    if isinstance(convention, EdgeConvention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    return CONVENTIONS[convention]


__all__ = ["DEFAULT_FRACTIONS", "MIB_FRACTIONS", "EdgeConvention", "CONVENTIONS", "get_convention"]
