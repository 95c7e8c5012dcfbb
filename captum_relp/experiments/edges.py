"""Edge-level experiment: RelP / RelP-AH / EAP / EAP-IG edge scores against exact edge patching,
evaluated as circuits (faithfulness curves, CPR, CMD under the library's or MIB's convention)
and by PCC with exact patching."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .._selection import top_finite
from ..calibration import CalibratedRules
from ..edges.conventions import EdgeConvention, get_convention
from ..edges.evaluate import FaithfulnessCurve, faithfulness_curve, pearson
from ..edges.graph import ComponentGraph, build_graph
from ..edges.scores import EdgeScores, edge_scores, exact_edge_scores
from ..integrations.distributed import DataParallelSweep
from ..plotting import EDGE_METHOD_LABELS as METHOD_NAMES
from .calibration_record import calibrate_run, calibration_entry, calibration_pairs, record_calibration

CALIBRATION_FILE = "edges_calibration.json"
"""Where :meth:`EdgeExperimentResult.save` writes rules calibrated in the run."""
SCORES_FILE = "edges_scores.npz"
"""Where :meth:`EdgeExperimentResult.save` writes every method's per-edge scores (:func:`edge_score_arrays`)."""
SCORE_METHODS = ("relp", "relp-ah", "relp-ah-qk", "relp-ah+qk", "calibrated", "eap", "eap-ig", "exact")
MIB_SCORE_SCALE = ("MIB stores scores divided by its batch size (the metric is averaged over each batch "
                   "before the backward pass, and the summed scores are divided by the number of prompts); "
                   "these scores are means over prompts: MIB's = these / batch size, the same ranking")


@dataclass
class EdgeExperimentResult:
    """Scores, curves and costs of an edge experiment.

    Attributes:
        model_name, task: labels.
        graph: the component graph.
        scores: ``{method: EdgeScores}``.
        curves: ``{method: FaithfulnessCurve}``.
        info: prompt counts, fractions, integration rule.
        calibrated: the rules of method ``calibrated`` when calibrated in this run (saved as
            :data:`CALIBRATION_FILE`; rules read from a file are not saved again).
    """

    model_name: str
    task: str
    graph: ComponentGraph
    scores: Dict[str, EdgeScores] = field(default_factory=dict)
    curves: Dict[str, FaithfulnessCurve] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)
    calibrated: Optional[CalibratedRules] = None

    def pcc_vs_exact(self, method: str) -> Optional[float]:
        """Pearson correlation of ``method``'s edge scores with exact edge patching."""
        if "exact" not in self.scores:
            return None
        return pearson(self.scores[method].edge_vector(self.graph), self.scores["exact"].edge_vector(self.graph))

    def pcc_by_input(self, method: str) -> Dict[str, Optional[float]]:
        """PCC with exact patching per kind of downstream input (``q``, ``k``, ``v``, ``mlp``, ``logits``)."""
        if "exact" not in self.scores:
            return {}
        kinds = [_kind(self.graph.downstream[v]) for _, v in self.graph.edges()]
        mine, exact = self.scores[method].edge_vector(self.graph), self.scores["exact"].edge_vector(self.graph)
        out = {}
        for kind in ("q", "k", "v", "mlp", "logits"):
            rows = torch.tensor([k == kind for k in kinds])
            value = pearson(mine[rows], exact[rows]) if rows.sum() > 1 else float("nan")
            out[kind] = None if value != value else value  # None: no edges, or constant scores (AH: q, k)
        return out

    def summary(self) -> Dict[str, Any]:
        """The JSON content: one entry per method plus ``meta``."""
        eap_seconds = self.scores["eap"].seconds if "eap" in self.scores else None
        out: Dict[str, Any] = {}
        for method, result in self.scores.items():
            curve = self.curves[method]
            vector = result.edge_vector(self.graph)
            order = top_finite(vector.abs(), min(20, int(vector.isfinite().sum())), "edges").tolist()
            edges = self.graph.edges()
            out[method] = {
                "cpr": curve.cpr, "cmd": curve.cmd, "curve": curve.as_dict(),
                "pcc_vs_exact": self.pcc_vs_exact(method) if method != "exact" else None,
                "seconds": result.seconds,
                "time_vs_eap": result.seconds / eap_seconds if eap_seconds else None,
                "n_forward": result.n_forward, "n_backward": result.n_backward,
                "top_edges": [[self.graph.edge_name(*edges[i]), float(vector[i])] for i in order],
                "pcc_vs_exact_by_input": self.pcc_by_input(method) if method != "exact" else None,
                "scores": [float(x) for x in vector],
            }
        if "task_check" in self.info:
            out["task"] = self.info["task_check"]
        out["meta"] = {"model": self.model_name, "task": self.task, "n_edges": self.graph.n_edges,
                       "n_layers": self.graph.n_layers, "n_heads": self.graph.n_heads,
                       "n_kv_heads": self.graph.n_kv_heads, "parallel_residual": self.graph.parallel,
                       **self.info,
                       "edges": [self.graph.edge_name(u, v) for u, v in self.graph.edges()]}
        return out

    def format_table(self) -> str:
        """A plain-text table: method, CPR, CMD, PCC vs exact, seconds, time vs EAP, passes."""
        rows = [f"{'method':8s} {'CPR':>7s} {'CMD':>7s} {'PCC':>7s} {'seconds':>8s} {'xEAP':>6s} {'fwd/bwd':>8s}"]
        for method, entry in self.summary().items():
            if method in ("meta", "task"):  # settings and the task check of a task file
                continue
            pcc = "-" if entry["pcc_vs_exact"] is None else f"{entry['pcc_vs_exact']:.3f}"
            ratio = "-" if entry["time_vs_eap"] is None else f"{entry['time_vs_eap']:.2f}"
            rows.append(f"{method:8s} {entry['cpr']:7.3f} {entry['cmd']:7.3f} {pcc:>7s} {entry['seconds']:8.3f} "
                        f"{ratio:>6s} {entry['n_forward']:>4d}/{entry['n_backward']:<3d}")
        return "\n".join(rows)

    def save(self, out_dir: Path, plots: bool = True, top_k: int = 20) -> List[Path]:
        """Write ``edges_results.json``, :data:`SCORES_FILE` (every method's per-edge scores, the
        edge names in order), :data:`CALIBRATION_FILE` for rules calibrated in the run, and
        (``plots``) ``edges_faithfulness.png`` and ``edges_circuit_<method>.png`` (MIB's greedy
        connected circuit of ``top_k`` edges)."""
        from ..plotting import plot_edge_circuit, plot_faithfulness_curves

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / "edges_results.json", out_dir / SCORES_FILE]
        written[0].write_text(json.dumps(self.summary(), indent=2))
        np.savez_compressed(written[1], **edge_score_arrays(self.graph, self.scores))
        if self.calibrated is not None:
            written.append(out_dir / CALIBRATION_FILE)
            self.calibrated.save(written[-1])
        if plots:
            title = f"{self.model_name}, {self.task}"
            written.append(out_dir / "edges_faithfulness.png")
            plot_faithfulness_curves(self.curves, title, written[-1])
            for method, result in self.scores.items():
                written.append(out_dir / f"edges_circuit_{method}.png")
                plot_edge_circuit(result.scores, self.graph, top_k,
                                  f"{title}: {METHOD_NAMES[method]}, greedy connected circuit of {top_k} edges",
                                  written[-1], method=method)
        return written


def edge_score_arrays(graph: ComponentGraph, scores: Dict[str, EdgeScores], prefix: str = "") -> Dict[str, np.ndarray]:
    """Per-edge scores as arrays for ``numpy.savez``: ``edges`` (the edge names in ``graph.edges()``
    order) and one float64 ``(n_edges,)`` vector per method (the values the PCCs are computed from).

    Args:
        graph (ComponentGraph): the graph the scores belong to.
        scores (dict): ``{method: EdgeScores}``.
        prefix (str): put before every key (e.g. ``"library/"`` when several graphs share one file).

    Returns:
        dict: ``{prefix + "edges": str array, prefix + method: float64 array}``.

    Examples::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> graph = build_graph(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))
        >>> ones = EdgeScores("eap", torch.ones(graph.edge_mask.shape), 1, 1, 0.0)
        >>> arrays = edge_score_arrays(graph, {"eap": ones}, prefix="library/")
        >>> sorted(arrays), arrays["library/eap"].dtype.name, len(arrays["library/edges"]) == graph.n_edges
        (['library/eap', 'library/edges'], 'float64', True)
    """
    arrays = {f"{prefix}edges": np.array([graph.edge_name(u, v) for u, v in graph.edges()])}
    for method, result in scores.items():
        arrays[f"{prefix}{method}"] = result.edge_vector(graph).detach().double().cpu().numpy()
    return arrays


def _kind(name: str) -> str:
    return name.split("<")[1].rstrip(">") if "<" in name else ("logits" if name == "logits" else "mlp")


def make_batch(tokenizer: Any, task: Any, n_prompts: int, seed: int, words: Optional[Sequence] = None,
               structure: str = "across_pp", start: int = 0):
    """An ``IOIBatch`` or ``SVABatch`` of ``n_prompts`` pairs (``words``: names or (sg, pl) nouns).

    For a :class:`~captum_relp.tasks.file_task.TaskFile`: its rows ``start`` to ``start + n_prompts``.

    Examples::

        >>> from captum_relp.embedded import load_embedded
        >>> _, tok = load_embedded("tiny-gpt2-ioi")
        >>> len(make_batch(tok, "ioi", 3, seed=0))
        3
    """
    if not isinstance(task, str):
        from ..tasks.file_encode import encode_task

        if len(task) < start + n_prompts:
            raise ValueError(f"{task.path}: {len(task)} rows, fewer than the {start + n_prompts} pairs asked for")
        return encode_task(task.pairs[start:start + n_prompts], tokenizer)
    if task == "ioi":
        from ..tasks.ioi import encode_ioi, generate_ioi_pairs

        return encode_ioi(generate_ioi_pairs(n_prompts, seed=seed, names=words, tokenizer=tokenizer), tokenizer)
    if task == "sva":
        from ..tasks.sva import encode_sva, generate_sva_pairs

        pairs = generate_sva_pairs(n_prompts, structure, seed=seed, nouns=words, tokenizer=tokenizer)
        return encode_sva(pairs, tokenizer)
    raise ValueError(f"task must be 'ioi' or 'sva', got {task!r}")


def run_edge_experiment(
    model: nn.Module,
    tokenizer: Any,
    task: str = "ioi",
    methods: Sequence[str] = SCORE_METHODS,
    n_prompts: int = 50,
    n_eval: Optional[int] = None,
    seed: int = 0,
    words: Optional[Sequence] = None,
    fractions: Optional[Sequence[float]] = None,
    n_steps: int = 5,
    repeats: int = 5,
    model_name: str = "model",
    structure: str = "across_pp",
    show_progress: bool = False,
    calibration_prompts: int = 20,
    convention: Union[str, EdgeConvention] = "library",
    ig_grid: Optional[str] = None,
    greedy: bool = False,
    calibrated: Optional[CalibratedRules] = None,
    calibrated_file: Optional[str] = None,
    calibration_default: Optional[str] = None,
) -> EdgeExperimentResult:
    """Score all edges with each method and evaluate circuits under ``convention``.

    Scores are computed on ``n_prompts`` pairs (seed ``seed``), faithfulness on
    ``n_eval`` other pairs (seed ``seed + 1``; default ``n_prompts``). Wall times
    are the minimum over ``repeats`` interleaved runs (after a warm-up run), all in this call,
    so ratios to EAP compare like with like.

    Args:
        model (nn.Module): a supported Hugging Face causal LM.
        tokenizer: its tokenizer.
        task (str or captum_relp.tasks.file_task.TaskFile): ``"ioi"``, ``"sva"``, or a task file: its first ``n_prompts`` rows
            are scored, the next ``n_eval`` evaluate the circuits, the next ``calibration_prompts``
            calibrate; the task check on the scored pairs is saved under ``"task"``.
        methods (sequence of str): among ``relp``, ``relp-ah``, ``relp-ah-qk``, ``relp-ah+qk``,
            ``calibrated``, ``eap``, ``eap-ig``, ``exact`` (see :func:`~captum_relp.edges.edge_scores`). ``calibrated``: RelP with rules chosen per component kind by
            :func:`~captum_relp.calibration.calibrate_on_batch` on ``calibration_prompts`` pairs
            of seed ``seed + 2`` (neither the scored nor the evaluated pairs); the choice is in
            ``info["calibration"]``.
        n_prompts, n_eval (int): scoring and evaluation prompt pairs.
        seed (int): prompt seed.
        words (sequence, optional): names (IOI) or (singular, plural) nouns (SVA).
        fractions (sequence of float, optional): circuit sizes; default: the convention's.
        n_steps (int): EAP-IG steps.
        repeats (int): timing repeats for the non-exact methods.
        model_name (str): label.
        structure (str): SVA structure.
        show_progress (bool): print a line per method.
        calibration_prompts (int): calibration pairs for ``calibrated``.
        convention (str or EdgeConvention): ``"library"`` or ``"mib"``
            (:mod:`captum_relp.edges.conventions`): circuit sizes, rounding, signed CPR,
            ungrouped key/value inputs and the default EAP-IG grid.
        ig_grid (str, optional): ``"right"`` or ``"left"``; default: the convention's.
        greedy (bool): MIB's greedy connected circuits instead of global top-k.
        calibrated (CalibratedRules, optional): rules for ``calibrated`` calibrated earlier (e.g.
            read with :meth:`~captum_relp.CalibratedRules.load`): used as they are, no calibration is run.
        calibrated_file (str, optional): the file ``calibrated`` was read from, named in ``info["calibration"]``.
        calibration_default (str, optional): the rule set each component kind keeps in the
            calibration unless a candidate beats it beyond the noise (``default`` of
            :func:`~captum_relp.calibration.calibrate_rules`; ``None``: the best fixed preset). A calibration
            that cannot run raises ``CalibrationFailed``, a ``ValueError`` naming the calibration pairs.

    Returns:
        EdgeExperimentResult

    Examples::

        >>> from captum_relp.embedded import load_embedded
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> r = run_edge_experiment(model, tok, methods=["eap"], n_prompts=2, repeats=1)
        >>> r.scores["eap"].n_backward
        1
    """
    unknown = [m for m in methods if m not in SCORE_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {SCORE_METHODS}, got {list(methods)}")
    convention = get_convention(convention)
    ig_grid = ig_grid or convention.ig_grid
    device = next(model.parameters()).device
    graph = build_graph(model, ungroup_kv=convention.ungroup_kv)
    batch = make_batch(tokenizer, task, n_prompts, seed, words, structure).to(device)
    held = make_batch(tokenizer, task, n_eval or n_prompts, seed + 1, words, structure, start=len(batch)).to(device)
    task_check, task_file = None, None
    if not isinstance(task, str):  # a task file: does the model solve it?
        from ..tasks.competence import competence_check

        task_check = competence_check(model, batch).to_json()
        task_file, task = task, str(task.path)
    args = (model, graph, batch.clean_ids, batch.corrupt_ids, batch.metric(), batch.attention_mask)
    edge_scores(*args, method="eap")  # warm-up
    fractions = list(convention.fractions if fractions is None else fractions)
    result = EdgeExperimentResult(model_name, task, graph, info={
        "n_prompts": len(batch), "n_eval": len(held), "seed": seed, "eap_ig_steps": n_steps,
        "convention": {**convention.as_dict(), "ig_grid": ig_grid, "greedy": greedy,
                       "ungrouped_kv": graph.ungrouped, "score_scale": MIB_SCORE_SCALE},
        "timing": f"min over {repeats} interleaved repeats after a warm-up (exact: one run)",
        "fractions": [float(f) for f in fractions], "scores": "mean over prompts, summed over positions",
    })
    if task_check is not None:
        result.info["task_check"] = task_check
    options = {m: {"method": m} for m in methods}
    if calibrated is not None and "calibrated" not in methods:
        raise ValueError("calibrated rules were given but methods has no 'calibrated'")
    if calibration_default is not None and (calibrated is not None or "calibrated" not in methods):
        raise ValueError("calibration_default applies only to a calibration in the run (methods with "
                         "'calibrated', no calibrated rules given)")
    if calibrated is not None:
        result.info["calibration"] = calibration_entry(calibrated, calibrated_file, loaded=True)
    elif "calibrated" in methods:
        began, start = time.perf_counter(), len(batch) + len(held)
        calibration = make_batch(tokenizer, task_file or task, calibration_prompts, seed + 2, words, structure,
                                 start=start)
        pairs = calibration_pairs(task_file.pairs[start:start + calibration_prompts]) if task_file is not None \
            else calibration_pairs(batch=calibration, tokenizer=tokenizer)
        where = f"{len(pairs)} {task} pairs (seed {seed + 2})" if task_file is None else \
            f"the {len(pairs)} calibration rows of {task}" + (f" (lines {pairs[0]['line']}-{pairs[-1]['line']})"
                                                               if pairs else "")
        calibrated = result.calibrated = record_calibration(
            calibrate_run(model, calibration, where, calibration_default), pairs, model_name, task=task, seed=seed + 2)
        result.info["calibration"] = calibration_entry(calibrated, CALIBRATION_FILE, time.perf_counter() - began)
        result.info["calibration"]["seed"] = seed + 2
    if calibrated is not None:
        options["calibrated"] = {"method": "relp", "rules": calibrated}
    timed = [m for m in methods if m != "exact"]
    runs: Dict[str, List[EdgeScores]] = {m: [] for m in timed}
    for _ in range(max(1, repeats)):  # interleaved, so that load from other processes hits all methods alike
        for method in timed:
            scores = edge_scores(*args, n_steps=n_steps, ig_grid=ig_grid, **options[method])
            runs[method].append(replace(scores, method=method))
    sweep = DataParallelSweep()  # under torchrun: exact's edge groups and the curves are sharded
    for method in methods:
        if method == "exact":
            result.scores[method] = exact_edge_scores(*args, sweep=sweep)
        else:
            result.scores[method] = min(runs[method], key=lambda r: r.seconds)
    curves = []
    for method in sweep.shard(list(methods)):  # this rank's methods, gathered in order below
        start = time.perf_counter()
        curves.append(faithfulness_curve(model, graph, result.scores[method].scores, held.clean_ids,
                                         held.corrupt_ids, held.metric(), held.attention_mask, fractions,
                                         convention=convention, greedy=greedy))
        if show_progress:
            print(f"{method}: scored in {result.scores[method].seconds:.2f}s, CPR {curves[-1].cpr:.3f} "
                  f"({time.perf_counter() - start:.1f}s evaluation)", flush=True)
    result.curves = dict(zip(methods, sweep.gather(curves, len(methods))))
    return result


__all__ = ["CALIBRATION_FILE", "SCORES_FILE", "SCORE_METHODS", "edge_score_arrays", "METHOD_NAMES", "EdgeExperimentResult", "make_batch", "run_edge_experiment"]
