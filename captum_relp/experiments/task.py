"""Attribution on a task file: AP, AtP and RelP per component type, which to trust on this task.

For the pairs of a task file (:mod:`captum_relp.tasks.file_task`), the run

1. checks that the model solves the task (:func:`~captum_relp.tasks.competence.competence_check`);
2. scores the residual stream entering each block, the attention outputs and the MLP outputs at
   every layer and position with AtP and the RelP presets on all pairs, and with activation
   patching (AP) on the first ``validate`` pairs;
3. reports how each method agrees with AP on those pairs: the per-prompt Pearson correlation
   with a 95% paired bootstrap interval over prompts, and whether a RelP preset loses to AtP
   beyond noise;
4. measures how linear the metric is on the task: AP run through the metric's first-order
   expansion around the clean logits (:func:`~captum_relp.tasks.file_metrics.linearized`),
   i.e. :math:`\\nabla M(z_{clean}) \\cdot (z_{clean} - z_{patched})` per component, correlated
   with AP. AtP and RelP are first-order methods: where this correlation is low, the metric's
   curvature (probabilities near 0 or 1) limits both, whatever the rules.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..attr import METHODS, LayerRelevancePatching, Method, get_method
from ..calibration import CalibratedRules
from ..models import COMPONENT_KINDS as KINDS
from ..models import COMPONENT_TITLES as KIND_TITLES
from ..models import model_components, model_name
from ..tasks.competence import Competence, competence_check
from ..tasks.file_encode import TaskBatch, describe_answers, encode_task
from ..tasks.file_metrics import linearized
from ..tasks.file_task import TaskFile, save_pairs
from .agreement import agreement_table, format_interval
from .alignment import RoleLayout
from .calibration_record import (
    calibrate_run,
    calibration_entry,
    calibration_pairs,
    describe_calibration,
    record_calibration,
)
from .checkpoint import Checkpoint, checkpointed, entry_key, run_fingerprint

LINEAR = "AP (first-order metric)"
"""AP through the metric's first-order expansion (the linearity report)."""
CALIBRATED = "RelP (calibrated)"
CALIBRATION_FILE = "task_calibration.json"
"""Where :meth:`TaskExperimentResult.save` writes rules calibrated in the run."""
LINEAR_ENOUGH = 0.9
"""Below this correlation of first-order AP with AP, the metric is reported as far from linear."""


@dataclass
class TaskExperimentResult:
    """Scores, agreement with AP and the task check of one run on a task file.

    Attributes:
        scores: ``{method: {kind: (rows, layers, T)}}``; ``AP`` and :data:`LINEAR` hold the
            first ``validate`` pairs, the other methods all pairs.
        valid: ``(N, T)`` real (non-pad) positions.
        agreement: ``{kind: {method: row of agreement_table}}`` on the validated pairs.
        linearity: ``{kind: {method: row}}``: agreement of AP, AtP and RelP with first-order AP.
        competence: the task check.
        notes: what the run tells the user (which method to trust, the metric's linearity).
        calibrated: the rules of ``RelP (calibrated)``, when calibrated in this run (saved as
            ``task_calibration.json``; rules read from a file are not saved again).
    """

    scores: Dict[str, Dict[str, np.ndarray]]
    valid: np.ndarray
    agreement: Dict[str, Dict[str, dict]]
    linearity: Dict[str, Dict[str, dict]]
    competence: Competence
    seconds: Dict[str, float]
    config: Dict[str, object]
    task: TaskFile
    layout: RoleLayout
    notes: List[str] = field(default_factory=list)
    answers: List[str] = field(default_factory=list)
    calibrated: Optional[CalibratedRules] = None

    def format_table(self) -> str:
        """The task check, the PCC tables with intervals, the linearity report and the notes."""
        lines = [self.competence.summary()]
        if self.answers:
            lines.append("answers given as ids, as this tokenizer reads them:")
            lines += [f"  {a}" for a in self.answers]
        methods = [m for m in self.scores if m not in ("AP", LINEAR)]
        if self.agreement:
            lines.append(f"\nPearson correlation with AP, per prompt, 95% bootstrap interval "
                         f"({self.config['model']}, {self.config['validate']} pairs)")
            lines.append(f"{'component':<20}" + "".join(f"{m:>24}" for m in methods))
            for kind in KINDS:
                lines.append(f"{KIND_TITLES[kind]:<20}" + "".join(
                    f"{format_interval(self.agreement[kind][m]):>24}" for m in methods))
        if self.linearity:
            lines.append("\nlinearity of the metric: first-order AP against AP, and each method against first-order AP")
            lines.append(f"{'component':<20}{'AP':>24}" + "".join(f"{m:>24}" for m in methods))
            for kind in KINDS:
                lines.append(f"{KIND_TITLES[kind]:<20}" + "".join(
                    f"{format_interval(self.linearity[kind][m]):>24}" for m in ["AP"] + methods))
        if self.config.get("calibration"):
            calibration = self.config["calibration"]
            lines.append(f"\n{describe_calibration(calibration)}:\n{calibration['summary']}")
        lines.append("\nwall time (s): " + ", ".join(f"{m} {s:.1f}" for m, s in self.seconds.items()))
        lines += [""] + self.notes
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Everything but the per-prompt scores (those go to ``task_scores.npz``)."""
        return {"config": self.config, "task": self.competence.to_json(), "agreement_with_ap": self.agreement,
                "linearity": self.linearity, "seconds": self.seconds, "notes": self.notes,
                "warnings": [f"the model may not solve this task: {w}" for w in self.competence.warnings],
                "answers_decoded": self.answers, "layout": self.layout.to_json()}

    def save(self, out_dir: Path, plots: bool = True) -> List[Path]:
        """Write ``task_results.json``, ``task_pcc.csv``, ``task_scores.npz``, ``task_pairs.jsonl``,
        one heatmap per component type and, for rules calibrated in the run, ``task_calibration.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / n for n in ("task_results.json", "task_pcc.csv", "task_scores.npz", "task_pairs.jsonl")]
        written[0].write_text(json.dumps(self.to_json(), indent=2))
        with written[1].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["component", "method", "reference", "pcc", "low", "high"])
            for reference, table in (("AP", self.agreement), (LINEAR, self.linearity)):
                for kind, rows in table.items():
                    for method, row in rows.items():
                        low, high = row.get("interval") or (None, None)
                        writer.writerow([kind, method, reference, row.get("pcc"), low, high])
        arrays = {f"{m}/{k}": v for m, by in self.scores.items() for k, v in by.items()}
        np.savez_compressed(written[2], valid=self.valid, last_pos=np.asarray(self.config["last_pos"]), **arrays)
        save_pairs(self.task.pairs, written[3])
        if self.calibrated is not None:
            written.append(out_dir / CALIBRATION_FILE)
            self.calibrated.save(written[-1])
        if plots and "AP" in self.scores:
            from ..plotting import plot_patching_heatmaps

            rows = self.scores["AP"]["mlp"].shape[0]
            for kind in KINDS:
                layout = RoleLayout(self.layout.roles, self.layout.labels, self.layout.index[:rows])
                maps = {m: layout.average(by[kind][:rows]) for m, by in self.scores.items()}
                path = out_dir / f"task_heatmap_{kind}.png"
                plot_patching_heatmaps(maps, KIND_TITLES[kind], path, self.layout.labels,
                                       model_name=str(self.config["model"]), n_prompts=rows,
                                       xlabel="position from the last prompt token")
                written.append(path)
        return written


def _layout(batch: TaskBatch) -> RoleLayout:
    """Positions named by their offset from the last prompt token (``END``, ``END-1``, ``END+1``)."""
    roles, tokens = [], []
    for last, length in zip(batch.last_pos.tolist(), batch.attention_mask.sum(1).tolist()):
        row = [f"END{t - last:+d}" if t != last else "END" for t in range(int(length))]
        roles.append(row)
        tokens.append(row)
    return RoleLayout.from_roles(roles, tokens)


def _rows(task: TaskFile) -> List[dict]:
    """The pairs as recorded in a checkpoint's fingerprint (every field but the file's path)."""
    return [{k: v for k, v in asdict(pair).items() if k != "source"} for pair in task.pairs]


def _stack(parts: List[List[torch.Tensor]], labels) -> Dict[str, np.ndarray]:
    per_layer = [torch.cat([p[i] for p in parts]) for i in range(len(labels))]
    return {kind: torch.stack([s for s, (k, _) in zip(per_layer, labels) if k == kind], dim=1).numpy()
            for kind in KINDS}


def _notes(agreement: Dict[str, Dict[str, dict]], linearity: Dict[str, Dict[str, dict]]) -> List[str]:
    notes = []
    for kind in KINDS:
        rows = agreement.get(kind, {})
        scored = {m: r["pcc"] for m, r in rows.items() if r.get("pcc") is not None}
        if scored:
            best = max(scored, key=scored.get)
            notes.append(f"{KIND_TITLES[kind]}: {best} agrees best with AP on this task ({scored[best]:.3f})")
        for method, row in rows.items():
            if row.get("loses"):
                lo, hi = row["margin_interval"]
                notes.append(f"{KIND_TITLES[kind]}: {method} loses to AtP beyond noise (PCC difference "
                             f"{row['margin']:.3f} [{lo:.2f}, {hi:.2f}]); try --rules calibrated, which chooses "
                             "the rules per component type on this task's pairs")
        ap = linearity.get(kind, {}).get("AP", {}).get("pcc")
        if ap is not None and ap < LINEAR_ENOUGH:
            notes.append(f"{KIND_TITLES[kind]}: the metric is far from linear on this task: first-order AP "
                         f"agrees with AP at {ap:.3f}; AtP and RelP are first-order and limited by it too "
                         "(a logit-difference metric is more linear than probabilities)")
    return notes


def run_task_experiment(
    model: nn.Module, tokenizer, task: TaskFile, metric: Optional[str] = None,
    rules: Sequence[str] = ("relp",), batch_size: int = 16, validate: Optional[int] = None,
    ap_batch_size: int = 64, show_progress: bool = True, calibration: Optional[TaskFile] = None,
    name: Optional[str] = None, seed: int = 0, linearity: bool = True,
    calibrated: Optional[CalibratedRules] = None, calibrated_file: Optional[str] = None,
    checkpoint: Optional[Checkpoint] = None, calibration_default: Optional[str] = None,
) -> TaskExperimentResult:
    """Run the task check, AtP, RelP and AP (on ``validate`` pairs) on a task file.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        task: the pairs (:func:`~captum_relp.tasks.file_task.load_task_file`).
        metric: one of :data:`~captum_relp.tasks.file_metrics.METRICS` (default by kind).
        rules: RelP presets (``relp``, ``relp-ah``) and ``calibrated`` (needs ``calibration`` or ``calibrated``).
        batch_size: pairs per attribution batch.
        validate: AP on the first ``validate`` pairs (default all; 0 skips AP).
        ap_batch_size: patched copies per forward pass in AP.
        calibration: separate pairs for ``calibrated`` (the rules are chosen on them).
        name: the model's name in the results; seed: of the bootstrap resamples.
        linearity: also run AP through the metric's first-order expansion.
        calibrated: rules for ``calibrated`` calibrated earlier (e.g. read with
            :meth:`~captum_relp.CalibratedRules.load`): used as they are, no calibration is run.
        calibrated_file: the file ``calibrated`` was read from, named in ``config["calibration"]``.
        checkpoint: each method's scores of each batch are saved there as they finish, and read
            back when that entry is saved (:mod:`~captum_relp.experiments.checkpoint`: a checkpoint
            of another configuration raises ``CheckpointMismatch``). The task check and the
            calibration run again on a resumed run; the wall times add the saved batches' times.
        calibration_default: the rule set each component type keeps in the calibration unless a
            candidate beats it beyond the noise (``default`` of
            :func:`~captum_relp.calibration.calibrate_rules`; ``None``: the best fixed preset).
            A calibration that cannot run (e.g. on pairs without effect) raises ``CalibrationFailed``,
            a ``ValueError`` naming the calibration pairs.

    Example:
        >>> import pathlib, tempfile
        >>> from captum_relp.embedded import load_embedded
        >>> from captum_relp.tasks import generate_ioi_pairs
        >>> from captum_relp.tasks.file_task import TaskFile, TaskPair
        >>> model, tok = load_embedded()
        >>> pairs = [TaskPair(p.clean_prompt, p.corrupt_prompt, answer=p.io_name, foil=p.s_name)
        ...          for p in generate_ioi_pairs(6, seed=2, tokenizer=tok)]
        >>> result = run_task_experiment(model, tok, TaskFile(pairs, "strings", "ioi.jsonl"), show_progress=False)
        >>> result.competence.clean_accuracy, sorted(result.agreement["mlp"])
        (1.0, ['AtP', 'RelP'])
    """
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batch = encode_task(task, tokenizer, metric, vocab_size=vocab, device=device)
    foil = encode_task(task, tokenizer, metric, vocab_size=vocab, device=device, swap=True) \
        if batch.metric_name == "logprob" else None
    validate = len(task) if validate is None else min(validate, len(task))
    calibrates = "calibrated" in rules and calibrated is None
    if calibration_default is not None and not calibrates:
        raise ValueError("calibration_default applies only to a calibration in the run (rules with 'calibrated', "
                         "no calibrated rules given)")
    if checkpoint is not None:  # before any work: a checkpoint of another configuration stops the run here
        checkpoint.open(run_fingerprint(
            model, experiment="task", pairs=_rows(task), batch=batch, rules=list(rules), validate=validate,
            linearity=linearity, calibration=None if calibration is None else _rows(calibration),
            batch_size=batch_size, ap_batch_size=ap_batch_size, seed=seed,
            calibrated=None if calibrated is None else calibrated.to_json(),
            **({"calibration_default": calibration_default or "best-preset"} if calibrates else {})))
    competence = competence_check(model, batch, foil, batch_size=batch_size, seed=seed)
    layers, flags, labels = model_components(model).select(KINDS)
    methods: Dict[str, Method] = {"AtP": METHODS["AtP"]}
    methods.update({get_method(p).name: METHODS[get_method(p).name] for p in rules if p != "calibrated"})
    calibration_info, calibrated_here = None, None
    if calibrated is not None and "calibrated" not in rules:
        raise ValueError("calibrated rules were given but rules has no 'calibrated'")
    if "calibrated" in rules:
        if calibrated is None:
            if calibration is None:
                raise ValueError("--rules calibrated needs calibration pairs apart from the evaluated ones")
            began = time.perf_counter()
            cal_batch = encode_task(calibration, tokenizer, batch.metric_name, vocab_size=vocab, device=device)
            lines = [p.line for p in calibration.pairs]
            where = f"the {len(lines)} calibration rows of {calibration.path}" + (
                f" (lines {min(lines)}-{max(lines)})" if lines and all(lines) else "")
            calibrated = calibrated_here = record_calibration(
                calibrate_run(model, cal_batch, where, calibration_default), calibration_pairs(calibration.pairs),
                name or model_name(model), task=str(calibration.path), metric=batch.metric_name)
            calibration_info = calibration_entry(calibrated, CALIBRATION_FILE, time.perf_counter() - began)
            calibration_info["lines"] = lines
        else:
            calibration_info = calibration_entry(calibrated, calibrated_file, loaded=True)
        methods[CALIBRATED] = Method(CALIBRATED, LayerRelevancePatching, "2 forward + 1 backward", {"rules": calibrated})
    if validate:
        methods = {"AP": METHODS["AP"], **methods}
    collected: Dict[str, List[List[torch.Tensor]]] = {m: [] for m in methods}
    if validate and linearity:
        collected[LINEAR] = []
    seconds = {m: 0.0 for m in collected}
    for start in tqdm(range(0, len(task), batch_size), desc="task batches", disable=not show_progress):
        part = batch.select(slice(start, start + batch_size))
        kwargs = dict(baselines=part.corrupt_ids, additional_forward_args={"attention_mask": part.attention_mask},
                      attribute_to_layer_input=flags)
        ap_rows = max(0, min(validate - start, len(part)))
        for method_name, method in methods.items():
            if method_name == "AP":
                if not ap_rows:
                    continue
                sub = part.select(slice(0, ap_rows))
                ap_kwargs = dict(kwargs, baselines=sub.corrupt_ids,
                                 additional_forward_args={"attention_mask": sub.attention_mask})
                for label in [m for m in ("AP", LINEAR) if m in collected]:
                    def compute(label=label, sub=sub, ap_kwargs=ap_kwargs, method=method):
                        metric = sub.metric()
                        if label == LINEAR:
                            with torch.no_grad():
                                metric = linearized(metric, model(sub.clean_ids, attention_mask=sub.attention_mask).logits)
                        return method.attribute(model, layers, sub.clean_ids, internal_batch_size=ap_batch_size,
                                                show_progress=show_progress, metric=metric, **ap_kwargs)

                    scores, spent = checkpointed(checkpoint, entry_key(label, start), compute)
                    seconds[label] += spent
                    collected[label].append(scores)
                continue
            scores, spent = checkpointed(checkpoint, entry_key(method_name, start), lambda method=method, part=part,
                                         kwargs=kwargs: method.attribute(model, layers, part.clean_ids, reduce="sum",
                                                                         metric=part.metric(), **kwargs))
            seconds[method_name] += spent
            collected[method_name].append(scores)
    by_method = {m: _stack(parts, labels) for m, parts in collected.items() if parts}
    valid = batch.attention_mask.bool().cpu().numpy()
    agreement: Dict[str, Dict[str, dict]] = {}
    linear_table: Dict[str, Dict[str, dict]] = {}
    others = [m for m in by_method if m not in ("AP", LINEAR)]
    if "AP" in by_method and validate >= 2:
        for kind in KINDS:
            agreement[kind] = agreement_table(by_method["AP"][kind], {m: by_method[m][kind][:validate] for m in others},
                                              valid[:validate], seed=seed)
            if LINEAR in by_method:
                linear_table[kind] = agreement_table(
                    by_method[LINEAR][kind], {m: by_method[m][kind][:validate] for m in ["AP"] + others},
                    valid[:validate], seed=seed)
    config = {"task": str(task.path), "kind": task.kind, "metric": batch.metric_name, "n_pairs": len(task),
              "validate": validate, "rules": list(rules), "batch_size": batch_size, "seed": seed,
              "model": name or model_name(model), "dtype": str(next(model.parameters()).dtype),
              "device": str(device), "n_layers": len(layers) // len(KINDS), "calibration": calibration_info,
              "digits_teacher_forced": bool(batch.digit_ids), "last_pos": batch.last_pos.tolist()}
    return TaskExperimentResult(by_method, valid, agreement, linear_table, competence, seconds, config, task,
                                _layout(batch), _notes(agreement, linear_table), describe_answers(task, tokenizer),
                                calibrated_here)


__all__ = ["TaskExperimentResult", "run_task_experiment", "LINEAR", "CALIBRATED", "CALIBRATION_FILE", "LINEAR_ENOUGH"]
