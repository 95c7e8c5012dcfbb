"""The sparse-feature-circuit experiment (paper section 5.2, Figure 3, appendix A.2)."""
from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._forward import call_model
from ..attr import get_method
from ..calibration import CalibratedRules
from ..circuits.effects import mean_effects, node_effects
from ..circuits.faithfulness import MIN_DENOMINATOR_SNR, CircuitCurve, evaluate_circuits
from ..circuits.feature_edges import FeatureEdges, feature_edges
from ..circuits.nodes import NodeSpace, node_means
from ..embedded.gguf import model_card
from ..integrations.distributed import DataParallelSweep
from ..models import model_name
from ..tasks import task_splits
from ..tasks.competence import competence_check
from .calibration_record import calibrate_run, calibration_entry, calibration_pairs, record_calibration

CIRCUIT_METHODS = ("RelP", "AtP", "IG")
"""The methods compared in the paper's Figure 3 (any of RelP, RelP+AH, AtP, IG may be run)."""
DEFAULT_BUDGETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
EDGE_RULES = {"RelP": "relp", "RelP+AH": "relp-ah", "AtP": "none"}
"""Rules of the feature edges per method (IG has no one-backward edge estimate and gets none)."""
CALIBRATION_FILE = "circuit_calibration_{setting}.json"
"""Where ``CircuitExperimentResult.save`` writes the rules calibrated for each setting
(:func:`calibration_file`)."""


def calibration_file(setting: str) -> str:
    """The name of the calibration file of ``setting`` (:data:`CALIBRATION_FILE`, characters
    other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-``).

    Example:
        >>> calibration_file("across_pp"), calibration_file("my task")
        ('circuit_calibration_across_pp.json', 'circuit_calibration_my-task.json')
    """
    return CALIBRATION_FILE.format(setting=re.sub(r"[^A-Za-z0-9._-]+", "-", setting))


@dataclass
class CircuitExperimentResult:
    """Curves ``{setting: {method: CircuitCurve}}``, cost ``{method: {...}}`` and, when
    requested, edges between the top nodes ``{setting: {method: FeatureEdges}}``; ``calibrated``:
    ``{setting: CalibratedRules}`` calibrated in the run (saved as :data:`CALIBRATION_FILE`)."""

    curves: Dict[str, Dict[str, CircuitCurve]]
    cost: Dict[str, Dict[str, float]]
    config: Dict[str, object] = field(default_factory=dict)
    edges: Dict[str, Dict[str, FeatureEdges]] = field(default_factory=dict)
    task_check: Optional[Dict[str, object]] = None
    """The task check of a task file (:class:`~captum_relp.tasks.competence.Competence`), saved under ``"task"``."""
    calibrated: Dict[str, CalibratedRules] = field(default_factory=dict)

    def denominators(self) -> Dict[str, Dict[str, float]]:
        """``{setting: {"m_full", "m_empty", "denominator", "se", "reliable"}}`` (the same for every method)."""
        out = {}
        for setting, by_method in self.curves.items():
            curve = next(iter(by_method.values()))
            out[setting] = {"m_full": curve.metric_full, "m_empty": curve.metric_empty,
                            "denominator": curve.denominator, "se": curve.denominator_se,
                            "reliable": curve.reliable}
        return out

    def title(self) -> str:
        """Figure title: model, task, node type and split sizes."""
        c = self.config
        return (f"{c.get('model')}: {str(c.get('task')).upper()} {str(c.get('nodes')).rstrip('s')} circuits "
                f"(train {c.get('n_train')}, test {c.get('n_test')} pairs per setting)")

    def summary(self) -> str:
        """A readable table: faithfulness/completeness at each size, per setting and method."""
        lines = []
        for setting, by_method in self.curves.items():
            d = self.denominators()[setting]
            flag = "" if d["reliable"] else "  NOISY: ratios unreliable"
            lines.append(f"{setting}: faithfulness / completeness by circuit size; denominator "
                         f"m(M) - m(empty) = {d['denominator']:.3f} +- {d['se']:.3f} (s.e.){flag}")
            for method, curve in by_method.items():
                points = "  ".join(f"{n}:{f:.2f}/{c:.2f}" for n, f, c in
                                   zip(curve.n_nodes, curve.faithfulness, curve.completeness))
                lines.append(f"  {method:<7} {points}")
        lines.append("cost of the node effects (all settings), measured in this run")
        base = self.cost.get("RelP", {}).get("seconds") or 1.0
        for method, cost in self.cost.items():
            lines.append(f"  {method:<7} {cost['seconds']:8.2f}s ({cost['seconds'] / base:5.2f}x RelP)  "
                         f"forward {int(cost['forward_passes'])}  backward {int(cost['backward_passes'])}")
        return "\n".join(lines)

    @classmethod
    def load(cls, out_dir: Path) -> "CircuitExperimentResult":
        """The curves, cost and config that ``save`` wrote to ``out_dir/circuit_results.json``
        (not the edges), e.g. to redraw the figure with :func:`~captum_relp.plotting.plot_faithfulness`.

        Example:
            >>> import tempfile
            >>> curve = CircuitCurve([1, 2], [0.5, 0.1], [0.2, 0.9], [0.8, 0.1], 1.0, 0.0, 0.1)
            >>> folder = Path(tempfile.mkdtemp())
            >>> _ = CircuitExperimentResult({"a": {"RelP": curve}}, {}, {"task": "sva"}).save(folder, plots=False)
            >>> CircuitExperimentResult.load(folder).curves["a"]["RelP"] == curve
            True
        """
        saved = json.loads((Path(out_dir) / "circuit_results.json").read_text())
        curves = {s: {m: CircuitCurve(**c) for m, c in by.items()} for s, by in saved["curves"].items()}
        return cls(curves, saved["cost"], saved["config"])

    def save(self, out_dir: Path, plots: bool = True) -> List[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "circuit_results.json"
        payload = {"config": self.config, "cost": self.cost, "denominators": self.denominators(),
                   "curves": {s: {m: asdict(c) for m, c in by.items()} for s, by in self.curves.items()}}
        if self.task_check is not None:
            payload["task"] = self.task_check
        path.write_text(json.dumps(payload, indent=2))
        written = [path]
        if self.edges:
            written.append(out_dir / "circuit_edges.json")
            written[-1].write_text(json.dumps({"config": self.config, "circuits": {
                s: {m: e.to_dict() for m, e in by.items()} for s, by in self.edges.items()}}, indent=1))
        for setting, rules in self.calibrated.items():
            written.append(out_dir / calibration_file(setting))
            rules.save(written[-1])
        if plots:
            from ..plotting import plot_faithfulness

            written.append(plot_faithfulness(self.curves, out_dir / "circuit_faithfulness.png", title=self.title()))
        return written


def _batches(batch, size: int):
    for start in range(0, len(batch), size):
        rows = slice(start, start + size)
        yield rows, batch.clean_ids[rows], batch.corrupt_ids[rows], batch.attention_mask[rows]


def run_circuit_experiment(
    model: nn.Module,
    tokenizer,
    task: str = "sva",
    methods: Sequence[str] = CIRCUIT_METHODS,
    nodes: str = "features",
    saes: Optional[Mapping[str, nn.Module]] = None,
    n_train: int = 300,
    n_test: int = 100,
    seed: int = 0,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    error_policy: str = "keep",
    exclude_first_third: bool = True,
    n_steps: int = 10,
    batch_size: int = 50,
    heldout: Optional[Sequence] = None,
    show_progress: bool = True,
    name: Optional[str] = None,
    report: Optional[Callable[[str], None]] = None,
    edge_nodes: int = 0,
    calibration_prompts: int = 0,
    calibrated: Optional[CalibratedRules] = None,
    calibrated_file: Optional[str] = None,
    calibration_default: Optional[str] = None,
) -> CircuitExperimentResult:
    """Discover circuits with each method on the training split and evaluate them on held-out data.

    Before the long part, a timed call per method on two training pairs gives the plan:
    passes per method and a rough time, passed to ``report`` (the CLI prints it). A
    setting whose denominator ``m(M) - m(empty)`` is under
    :data:`~captum_relp.circuits.faithfulness.MIN_DENOMINATOR_SNR` standard errors
    raises a :class:`UserWarning`: its ratios can overshoot 1 or fall far below 0.
    With ``edge_nodes > 0`` the edges between the ``edge_nodes`` top nodes of each
    setting and method (RelP, RelP+AH, AtP) are scored on the first training batch
    with :func:`~captum_relp.circuits.feature_edges.feature_edges` (``result.edges``,
    saved as ``circuit_edges.json``).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        task: ``sva`` (one setting per structure), ``ioi``, or a
            :class:`~captum_relp.tasks.file_task.TaskFile` (one setting; the task check is run on
            its training pairs and kept in ``task_check``).
        methods: node scorers (``RelP``, ``RelP+AH``, ``AtP``, ``IG``).
        nodes: ``components``, ``neurons`` or ``features`` (needs ``saes``).
        saes: one dictionary per submodule, for ``features``.
        n_train: pairs per setting to score nodes on.
        n_test: pairs per setting to evaluate circuits on.
        seed: prompt generator seed.
        budgets: circuit sizes.
        error_policy: see :func:`~captum_relp.circuits.faithfulness.evaluate_circuits`.
        exclude_first_third: see :func:`~captum_relp.circuits.faithfulness.evaluate_circuits`.
        n_steps: IG integration steps.
        batch_size: pairs per attribution batch.
        heldout: words for the test split (e.g. nouns never seen in training).
        show_progress: a progress bar naming the current setting and method.
        name: the model's name in results and titles (default :func:`~captum_relp.models.model_name`).
        report: called with the cost plan and one line per finished (setting, method).
        edge_nodes: top nodes between which edges are scored (0: no edges).
        calibration_prompts: when > 0, RelP (which ``methods`` must hold) uses rules calibrated per
            component kind (:func:`~captum_relp.calibration.calibrate_on_batch`) on the first
            ``calibration_prompts`` training pairs of each setting (never the test pairs);
            each node group gets the rule set chosen for its kind. The choices and their
            evidence are in ``config["calibration"]``, the rules in ``result.calibrated``.
        calibrated: rules calibrated earlier (e.g. read with :meth:`~captum_relp.CalibratedRules.load`),
            used by RelP in every setting as they are: no calibration is run.
        calibrated_file: the file ``calibrated`` was read from (named in ``config["calibration"]``).
        calibration_default: the rule set each component kind keeps in the calibration unless a
            candidate beats it beyond the noise (``default`` of
            :func:`~captum_relp.calibration.calibrate_rules`; ``None``: the best fixed preset). A calibration
            that cannot run raises ``CalibrationFailed``, a ``ValueError`` naming the calibration pairs.

    Returns:
        CircuitExperimentResult

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> model, tokenizer = load_embedded()
        >>> result = run_circuit_experiment(model, tokenizer, "sva", methods=["RelP"], nodes="components",
        ...                                 n_train=4, n_test=4, budgets=[1, 4], show_progress=False)
        >>> sorted(result.curves)
        ['across_pp', 'across_rc', 'within_rc']
    """
    label = name or model_name(model)
    methods = [get_method(m).name for m in methods]
    if "AP" in methods:
        raise ValueError("circuit discovery scores nodes with RelP, RelP+AH, AtP or IG, not AP")
    if (calibration_prompts > 0 or calibrated is not None) and "RelP" not in methods:
        raise ValueError(f"calibrated rules are used by RelP only, and methods {list(methods)} has no RelP")
    if calibration_default is not None and not (calibration_prompts > 0 and calibrated is None):
        raise ValueError("calibration_default applies only to a calibration in the run (calibration_prompts > 0, "
                         "no calibrated rules given)")
    space = NodeSpace(model, nodes, saes)
    sweep, device = DataParallelSweep(), next(model.parameters()).device  # torchrun: shard the batches
    curves: Dict[str, Dict[str, CircuitCurve]] = {}
    edges: Dict[str, Dict[str, FeatureEdges]] = {}
    cost = {m: {"seconds": 0.0, "forward_passes": 0, "backward_passes": 0} for m in methods}
    settings = task_splits(task, tokenizer, n_train, n_test, seed, heldout)
    task_check, task_file = None, None
    if not isinstance(task, str):  # a task file: does the model solve it?
        task_check = competence_check(model, settings[0][1], batch_size=batch_size).to_json()
        if report is not None and task_check["warnings"]:
            report("\n".join(f"WARNING: the model may not solve this task: {w}" for w in task_check["warnings"]))
        task_file, task = task, str(task.path)
    calibration: Dict[str, Dict] = {}
    calibrated_here: Dict[str, CalibratedRules] = {}
    progress = tqdm(total=len(settings) * (len(methods) + 1), desc=f"{task} {nodes} circuits",
                    disable=not show_progress)
    plan = _warm_up(space, methods, settings[0][1], n_steps)
    if report is not None:
        report(format_plan(plan, [len(train) for _, train, _ in settings], batch_size))
    for setting, train, test in settings:
        if train.clean_ids.shape[1] != test.clean_ids.shape[1]:
            raise ValueError(f"{setting}: train and test prompts differ in length; positions must align")
        rules = None
        if calibrated is not None:
            rules = calibrated
            calibration[setting] = calibration_entry(rules, calibrated_file, loaded=True)
        elif calibration_prompts > 0:
            began, part = time.perf_counter(), train.select(slice(0, calibration_prompts))
            pairs = calibration_pairs(task_file.pairs[:len(part)]) if task_file is not None else \
                calibration_pairs(batch=part, tokenizer=tokenizer)
            rules = calibrated_here[setting] = record_calibration(
                calibrate_run(model, part, f"the first {len(part)} training pairs of {setting}", calibration_default),
                pairs, label, task=task, setting=setting, seed=seed)
            calibration[setting] = calibration_entry(rules, calibration_file(setting),
                                                     time.perf_counter() - began)
        means = _train_means(space, model, train, batch_size)
        run_metric = _metric_runner(model, test, batch_size)
        curves[setting] = {}
        for method in methods:
            progress.set_description(f"{setting}: {method}")
            totals: Dict[str, Tensor] = {}
            batches = list(_batches(train, batch_size))
            mine, spent = [], {"seconds": 0.0, "forward_passes": 0, "backward_passes": 0}
            for rows, clean, corrupt, mask in sweep.shard(batches):  # torchrun: this rank's batches
                run = node_effects(space, method, clean, corrupt, train.select(rows).metric(), mask, n_steps=n_steps,
                                   rules=rules if method == "RelP" else None)
                mine.append({name: values.sum(0, keepdim=True).cpu() for name, values in run.effects.items()})
                for key in spent:
                    spent[key] += getattr(run, key)
            for batch_sums in sweep.gather(mine, len(batches)):  # summed in batch order on every rank
                for name, values in batch_sums.items():
                    totals[name] = totals.get(name, 0) + values.to(device)
            for key, value in sweep.sum(spent).items():
                cost[method][key] += value if key == "seconds" else int(value)
            effects = mean_effects({n: v / len(train) for n, v in totals.items()})
            curves[setting][method] = evaluate_circuits(space, effects, means, run_metric, budgets,
                                                        exclude_first_third, error_policy)
            if edge_nodes > 0 and method in EDGE_RULES:
                rows, clean, corrupt, mask = next(_batches(train, batch_size))
                edges.setdefault(setting, {})[method] = feature_edges(
                    space, clean, corrupt, train.select(rows).metric(), mask, EDGE_RULES[method], edge_nodes)
            progress.update()
            if report is not None:
                report(f"{setting}: {method} done ({cost[method]['seconds']:.1f} s so far for {method})")
        progress.update()
        curve = next(iter(curves[setting].values()))
        if not curve.reliable:
            warnings.warn(f"{setting}: m(M) - m(empty) = {curve.denominator:.3g} is under "
                          f"{MIN_DENOMINATOR_SNR:g} standard errors ({curve.denominator_se:.3g}); its "
                          "faithfulness/completeness ratios are unreliable (more --n-test pairs help)")
    progress.close()
    config = {"model": label, "model_card": model_card(model), "task": task, "nodes": nodes,
              "methods": list(methods), "n_train": n_train, "n_test": n_test,
              "seed": seed, "error_policy": error_policy, "exclude_first_third": exclude_first_third,
              "n_steps": n_steps, "edge_nodes": edge_nodes, "calibration": calibration}
    return CircuitExperimentResult(curves, cost, config, edges, task_check, calibrated_here)


def _warm_up(space: NodeSpace, methods: Sequence[str], train, n_steps: int) -> Dict[str, Dict[str, float]]:
    """Calls per method on two examples (not counted in the timings), so one-off setup does not
    skew them; the last call's passes and seconds per pair are the plan."""
    rows, clean, corrupt, mask = next(_batches(train, 2))
    plan = {}
    for method in methods:
        for _ in range(1 if method == "IG" else 2):
            run = node_effects(space, method, clean, corrupt, train.select(rows).metric(), mask, n_steps=n_steps)
        plan[method] = {"forward_passes": run.forward_passes, "backward_passes": run.backward_passes,
                        "seconds_per_pair": run.seconds / clean.shape[0]}
    return plan


def format_plan(plan: Mapping[str, Mapping[str, float]], n_train: Sequence[int], batch_size: int) -> str:
    """The expected cost of scoring nodes: passes per batch and in all, and a rough time, per method.

    Args:
        plan: ``{method: {"forward_passes", "backward_passes", "seconds_per_pair"}}`` per batch.
        n_train: training pairs of each setting.
        batch_size: pairs per attribution batch.

    Example:
        >>> print(format_plan({"RelP": {"forward_passes": 2, "backward_passes": 1,
        ...                             "seconds_per_pair": 0.01}}, [100, 100], 50))
        expected cost of the node effects (2 settings, 4 batches of up to 50 pairs):
          RelP    2 forward + 1 backward per batch = 8 forward + 4 backward in all, about 2 s
    """
    batches = sum(-(-n // batch_size) for n in n_train)
    lines = [f"expected cost of the node effects ({len(n_train)} settings, {batches} batches of up to "
             f"{batch_size} pairs):"]
    for method, cost in plan.items():
        forward, backward = int(cost["forward_passes"]), int(cost["backward_passes"])
        lines.append(f"  {method:<7} {forward} forward + {backward} backward per batch = {forward * batches} "
                     f"forward + {backward * batches} backward in all, "
                     f"about {cost['seconds_per_pair'] * sum(n_train):.0f} s")
    return "\n".join(lines)


def _train_means(space: NodeSpace, model, train, batch_size: int) -> Dict[str, Tensor]:
    sums: Dict[str, Tensor] = {}
    for rows, clean, _, mask in _batches(train, batch_size):
        means = node_means(space, lambda ids: call_model(model, (ids,), (), {"attention_mask": mask}), [clean])
        for name, value in means.items():
            sums[name] = sums.get(name, 0) + value * clean.shape[0]
    return {name: value / len(train) for name, value in sums.items()}


def _metric_runner(model, test, batch_size: int):
    def run() -> Tensor:
        values = []
        with torch.no_grad():
            for rows, clean, _, mask in _batches(test, batch_size):
                logits = call_model(model, (clean,), (), {"attention_mask": mask})
                values.append(test.select(rows).metric()(logits))
        return torch.cat(values)

    return run
