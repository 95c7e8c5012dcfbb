"""Sampled PCC with exact edge patching for ``make_edge_results.py --exact-sample N``.

Exact edge patching costs one patched run per edge, too much for every edge of a real
model. This scores a uniform random sample of edges (seeded) and, separately, the union of
the top edges by ``|score|`` of RelP (``relp-ah-qk``), EAP and EAP-IG, and reports each
method's PCC with the exact effects on both sets, with 95% percentile-bootstrap intervals
over the sampled edges (the scoring prompts are fixed). Results are merged into a saved
cell's JSON (``exact_sample`` of one convention) and rendered by ``section``.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from captum_relp.edges import EdgeScores, edge_scores, exact_edge_scores, pearson

TOP_METHODS = ("relp-ah-qk", "eap", "eap-ig")  # the union of their top edges is scored exactly
DIFFERENCES = (("relp-ah-qk", "eap"), ("relp-ah-qk", "eap-ig"), ("relp", "eap"), ("relp", "eap-ig"))


def method_scores(model, graph, batch, methods, grid: str, n_steps: int) -> Dict[str, EdgeScores]:
    """One scoring run per method on the cell's scoring prompts (the same calls as ``score``)."""
    args = (model, graph, batch.clean_ids, batch.corrupt_ids, batch.metric(), batch.attention_mask)
    return {m: edge_scores(*args, method=m, n_steps=n_steps, ig_grid=grid) for m in methods}


def uniform_positions(n_edges: int, n_sample: int, seed: int) -> Tensor:
    """``n_sample`` distinct positions in ``graph.edges()``, uniform without replacement, sorted."""
    if not 2 < n_sample <= n_edges:
        raise ValueError(f"--exact-sample must be in 3 .. {n_edges}, got {n_sample}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_edges, generator=generator)[:n_sample].sort().values


def top_union(graph, scores: Dict[str, EdgeScores], k: int) -> Tensor:
    """Sorted positions of the union of each ``TOP_METHODS`` method's top-``k`` edges by ``|score|``."""
    tops = [scores[m].edge_vector(graph).abs().topk(k).indices for m in TOP_METHODS]
    return torch.cat(tops).unique().sort().values


def _bootstrap_pcc(vectors: Dict[str, Tensor], exact: Tensor, n_boot: int, seed: int) -> Dict[str, List[float]]:
    """Per method (and per pair in ``DIFFERENCES``) the 95% percentile interval of the PCC over
    edge resamples; every method sees the same resampled edges (paired differences)."""
    generator = torch.Generator().manual_seed(seed)
    n = exact.numel()
    draws: Dict[str, List[float]] = {m: [] for m in vectors}
    for _ in range(n_boot):
        index = torch.randint(n, (n,), generator=generator)
        for method, vector in vectors.items():
            draws[method].append(pearson(vector[index], exact[index]))
    out = {m: _interval(values) for m, values in draws.items()}
    for a, b in DIFFERENCES:
        if a in draws and b in draws:
            out[f"{a}-minus-{b}"] = _interval([x - y for x, y in zip(draws[a], draws[b])])
    return out


def percentiles(values: List[float]) -> List[float]:
    """The 95% percentile interval of bootstrap draws (``make_edge_results.py`` uses it too)."""
    t = torch.tensor(values, dtype=torch.float64)
    return [float(t.quantile(0.025)), float(t.quantile(0.975))]


def _interval(values: List[float]) -> List[float]:
    return percentiles([v for v in values if v == v])  # a resample with a constant vector has no PCC (nan)


def _pcc_block(graph, scores: Dict[str, EdgeScores], exact: EdgeScores, positions: Tensor, n_boot: int,
               seed: int) -> Dict:
    """PCCs and intervals of every method on the exactly scored ``positions``."""
    scored = exact.scored_vector(graph)
    if not bool(scored[positions].all()) or int(scored.sum()) != positions.numel():
        raise RuntimeError("the exact run scored other edges than the sample")
    truth = exact.edge_vector(graph)[positions]
    vectors = {m: s.edge_vector(graph)[positions] for m, s in scores.items()}
    return {"n": positions.numel(), "seconds": exact.seconds, "n_forward": exact.n_forward,
            "pcc": {m: pearson(v, truth) for m, v in vectors.items()},
            "intervals": _bootstrap_pcc(vectors, truth, n_boot, seed),
            "positions": positions.tolist(), "exact": truth.tolist()}


def sampled_pcc(model, graph, batch, scores: Dict[str, EdgeScores], n_sample: int, seed: int, top: int,
                n_boot: int, max_rows: int) -> Dict:
    """Exact scores of a uniform sample and of the top-edge union; each method's PCC on both."""
    args = (model, graph, batch.clean_ids, batch.corrupt_ids, batch.metric(), batch.attention_mask)
    out: Dict = {"seed": seed, "top": top, "top_methods": list(TOP_METHODS), "n_boot": n_boot,
                 "max_rows": max_rows, "n_edges": graph.n_edges}
    for name, positions in (("uniform", uniform_positions(graph.n_edges, n_sample, seed)),
                            ("top_union", top_union(graph, scores, top))):
        exact = exact_edge_scores(*args, max_rows=max_rows, edges=positions)
        out[name] = _pcc_block(graph, scores, exact, positions, n_boot, seed)
        print(f"  exact on {name}: {positions.numel()} edges, {exact.seconds:.0f}s, {exact.n_forward} forwards; "
              + ", ".join(f"{m} {v:.3f}" for m, v in out[name]["pcc"].items()), flush=True)
    return out


def ci(value: float, interval: List[float], signed: bool = False) -> str:
    """``value [low, high]`` to three decimals (``make_edge_results.py`` uses it too)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(value)} [{f.format(interval[0])}, {f.format(interval[1])}]"


def sample_section(convention: str, sample: Dict, methods) -> List[str]:
    """The page's paragraph and table for one convention's sampled PCC."""
    uniform, union = sample["uniform"], sample["top_union"]
    lines = [f"**PCC with exact edge patching, on sampled edges** ({convention} convention, "
             f"{sample['n_edges']} edges). It is a sample: exact scores of {uniform['n']} edges drawn uniformly "
             f"without replacement (seed {sample['seed']}; {uniform['seconds']:.0f} s, {uniform['n_forward']} "
             f"forwards of the scoring batch, patched copies stacked up to {sample['max_rows']} rows) and, "
             f"separately, of the union of the top-{sample['top']} edges by \\|score\\| of "
             f"{', '.join(sample['top_methods'])} ({union['n']} edges; {union['seconds']:.0f} s, "
             f"{union['n_forward']} forwards), on the same scoring prompts. The uniform column estimates the PCC "
             f"over all edges; brackets: 95% percentile bootstrap over the sampled edges ({sample['n_boot']} "
             "resamples, scoring prompts fixed). The top-edge column is not a random sample: it checks the edges "
             "that circuits are built from.", "",
             "| method | PCC, uniform sample | PCC, top-edge union |", "|---|---:|---:|"]
    for method in methods:
        if method in uniform["pcc"]:
            lines.append(f"| {method} | {ci(uniform['pcc'][method], uniform['intervals'][method])} | "
                         f"{ci(union['pcc'][method], union['intervals'][method])} |")
    return lines + ["", _spread(sample) + " " + sample_reading(sample)]


def _spread(sample: Dict) -> str:
    """How heavy-tailed the exact effects are: why the uniform estimate can be wide."""
    uniform = torch.tensor(sample["uniform"]["exact"]).abs()
    top = torch.tensor(sample["top_union"]["exact"]).abs()
    return (f"The uniform sample holds {100 * uniform.numel() / sample['n_edges']:.1f}% of the edges; its exact "
            f"effects are heavy-tailed (median \\|effect\\| {uniform.median():.1e}, largest {uniform.max():.1e}, "
            f"against {top.max():.1e} in the top-edge union), so a few edges drive its PCC and the interval is wide.")


def sample_reading(sample: Dict) -> str:
    """Where RelP's PCC beats or loses to EAP and EAP-IG, by the paired intervals."""
    parts = []
    for name, label in (("uniform", "uniform sample"), ("top_union", "top-edge union")):
        block, verdicts = sample[name], []
        for a, b in DIFFERENCES:
            key = f"{a}-minus-{b}"
            if key not in block["intervals"]:
                continue
            lo, hi = block["intervals"][key]
            delta = block["pcc"][a] - block["pcc"][b]
            word = ("higher than" if lo > 0 else "lower than (RelP loses to)" if hi < 0 else
                    f"{'below' if delta < 0 else 'above'} but within noise of")
            verdicts.append(f"{a} {word} {b} ({delta:+.3f}, interval [{lo:+.3f}, {hi:+.3f}])")
        parts.append(f"On the {label}: " + "; ".join(verdicts) + ".")
    return "Paired bootstrap of the PCC differences. " + " ".join(parts)
