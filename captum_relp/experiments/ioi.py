"""IOI faithfulness experiment (paper section 5.1, Table 5, Figure 2).

For N prompt pairs, AP, AtP and RelP scores of the residual stream entering each
block, the attention outputs and the MLP outputs, at every layer and position,
summed over the hidden dimension; Pearson correlation of AtP and RelP with AP.

The templates differ in length, so prompt-averaged maps align positions by token
role (``S1``, ``IO``, ``S2``, ``END`` ..., see :func:`~captum_relp.tasks.ioi.ioi_token_roles`)
and average each role over the prompts that have it.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..attr import METHODS, LayerRelevancePatching, Method, get_method
from ..calibration import CalibratedRules, calibrated_ioi_rules
from ..embedded.gguf import model_card
from ..integrations.distributed import DataParallelSweep
from ..models import COMPONENT_KINDS as KINDS
from ..models import COMPONENT_TITLES as KIND_TITLES
from ..models import model_components, model_name
from ..tasks.ioi import encode_ioi, generate_ioi_pairs, ioi_token_roles
from .agreement import agreement_table
from .alignment import RoleLayout
from .calibration_record import calibrating, calibration_entry, record_calibration
from .checkpoint import Checkpoint, checkpointed, entry_key, run_fingerprint

CALIBRATED = "RelP (calibrated)"
CALIBRATION_FILE = "ioi_calibration.json"
"""Where :meth:`IOIExperimentResult.save` writes rules calibrated in the run."""


@dataclass
class IOIExperimentResult:
    """Scores and correlations of one IOI run.

    Attributes:
        scores: ``{method: {kind: array (N, layers, positions)}}`` (``AP``, ``AtP``, ``RelP``...).
        valid: ``(N, positions)`` boolean mask of real (non-pad) positions.
        pcc_per_prompt: ``{kind: {method: r}}`` over all per-prompt (layer, position) values.
        pcc_mean_map: ``{kind: {method: r}}`` over the prompt-averaged, role-aligned
            (layer x role) maps of :meth:`mean_maps`.
        agreement: ``{kind: {method: row}}``: ``pcc_per_prompt`` with its 95% bootstrap interval
            over the prompts and the paired difference to AtP
            (:func:`~captum_relp.experiments.agreement.agreement_table`); empty without AP.
        seconds: wall time per method, measured in the same run.
        config: the run's settings (``model`` is the model's name, not a path; ``model_card``
            the architecture, quantization, source and sha256 of a model loaded from a GGUF
            file or fetched, else ``None``).
        layout: the token role of every position of every prompt; ``None`` averages
            position by position (only right for prompts of one layout).
        calibrated: the rules of ``RelP (calibrated)`` when calibrated in this run (saved as
            ``ioi_calibration.json``; rules read from a file are not saved again).
    """

    scores: Dict[str, Dict[str, np.ndarray]]
    valid: np.ndarray
    pcc_per_prompt: Dict[str, Dict[str, float]]
    pcc_mean_map: Dict[str, Dict[str, float]]
    seconds: Dict[str, float]
    config: Dict[str, object]
    layout: Optional[RoleLayout] = None
    calibrated: Optional[CalibratedRules] = None
    agreement: Dict[str, Dict[str, dict]] = field(default_factory=dict)

    @property
    def position_labels(self) -> List[str]:
        """Tick labels of the columns of :meth:`mean_maps` (roles, or positions without a layout)."""
        if self.layout is not None:
            return list(self.layout.labels)
        return [str(t) for t in range(self.valid.shape[1])]

    def mean_maps(self) -> Dict[str, Dict[str, np.ndarray]]:
        """``{method: {kind: (layers, roles)}}``: each token role averaged over the prompts that have it.

        Without a :attr:`layout`, ``(layers, positions)`` averaged over prompts at real positions.
        """
        if self.layout is not None:
            return {method: {kind: self.layout.average(values) for kind, values in by_kind.items()}
                    for method, by_kind in self.scores.items()}
        weights = self.valid[:, None, :].astype(float)
        count = np.maximum(weights.sum(0), 1.0)
        return {
            method: {kind: (values * weights).sum(0) / count for kind, values in by_kind.items()}
            for method, by_kind in self.scores.items()
        }

    def time_ratios(self) -> Dict[str, float]:
        """Wall time of each method divided by AtP's."""
        base = self.seconds.get("AtP") or 1.0
        return {method: seconds / base for method, seconds in self.seconds.items()}

    def format_table(self) -> str:
        """The PCC tables in the layout of the paper's Table 5, plus the time ratios."""
        methods = [m for m in self.scores if m != "AP"]
        lines = []
        if "AP" not in self.scores:  # no reference: every correlation would be NaN
            lines.append(f"AP was not run (methods {', '.join(methods)}): no correlation with activation "
                         "patching to report; the scores are saved")
            lines.append("")
        for title, table in (() if "AP" not in self.scores else (("per-prompt maps", self.pcc_per_prompt),
                             ("prompt-averaged maps", self.pcc_mean_map))):
            lines.append(f"Pearson correlation with activation patching ({title}, "
                         f"{self.config.get('model')}, N={self.config['n_prompts']})")
            widths = [max(13, len(m) + 2) for m in methods]
            lines.append(f"{'component':<20}" + "".join(f"{m:>{w}}" for m, w in zip(methods, widths)))
            for kind in KINDS:
                lines.append(f"{KIND_TITLES[kind]:<20}"
                             + "".join(f"{table[kind][m]:>{w}.3f}" for m, w in zip(methods, widths)))
                rows = self.agreement.get(kind, {}) if table is self.pcc_per_prompt else {}
                if rows:  # the 95% bootstrap interval over the prompts
                    lines.append(f"{'':<20}" + "".join(f"{_bracket(rows.get(m)):>{w}}" for m, w in zip(methods, widths)))
            lines.append("")
        ratios = self.time_ratios()
        lines.append("wall time (s, summed over batches, one run) and ratio to AtP, measured in this run")
        for method, seconds in self.seconds.items():
            lines.append(f"{method:<20}{seconds:>10.2f}{ratios[method]:>9.2f}x")
        return "\n".join(lines)

    def save(self, out_dir: Path, plots: bool = True) -> List[Path]:
        """Write ``ioi_results.json``, ``ioi_pcc.csv``, ``ioi_scores.npz`` (the per-prompt scores,
        ``<method>/<kind>`` arrays ``(N, layers, positions)`` and ``valid``), one heatmap PNG per
        component type and, for rules calibrated in the run, ``ioi_calibration.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / "ioi_results.json", out_dir / "ioi_pcc.csv", out_dir / "ioi_scores.npz"]
        summary = {
            "config": self.config, "pcc_per_prompt": self.pcc_per_prompt,
            "pcc_mean_map": self.pcc_mean_map, "agreement_with_ap": self.agreement, "seconds": self.seconds,
            "time_ratio_to_atp": self.time_ratios(), "position_labels": self.position_labels,
            "layout": self.layout.to_json() if self.layout is not None else None,
            "mean_maps": {m: {k: v.tolist() for k, v in by.items()} for m, by in self.mean_maps().items()},
        }
        written[0].write_text(json.dumps(summary, indent=2))
        with written[1].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["component", "method", "pcc_per_prompt", "pcc_mean_map"])
            for kind in KINDS:
                for method in self.pcc_per_prompt[kind]:
                    writer.writerow([kind, method, f"{self.pcc_per_prompt[kind][method]:.4f}",
                                     f"{self.pcc_mean_map[kind][method]:.4f}"])
        np.savez_compressed(written[2], valid=self.valid,
                            **{f"{m}/{k}": v for m, by in self.scores.items() for k, v in by.items()})
        if self.calibrated is not None:
            written.append(out_dir / CALIBRATION_FILE)
            self.calibrated.save(written[-1])
        if plots:
            from ..plotting import plot_patching_heatmaps

            maps = self.mean_maps()
            for kind in KINDS:
                path = out_dir / f"ioi_heatmap_{kind}.png"
                plot_patching_heatmaps({m: maps[m][kind] for m in maps}, KIND_TITLES[kind], path,
                                       self.position_labels, model_name=str(self.config.get("model")),
                                       n_prompts=int(self.config["n_prompts"]),
                                       xlabel="token role" if self.layout is not None else "position")
                written.append(path)
        return written


def _bracket(row: Optional[dict]) -> str:
    interval = (row or {}).get("interval")
    return "[n/a]" if not interval else f"[{interval[0]:.2f},{interval[1]:.2f}]"


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant.

    Example:
        >>> round(pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])), 3)
        0.993
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _calibrate(model: nn.Module, tokenizer, n_prompts: int, seed: int, exclude: Sequence,
               default: Optional[str]) -> CalibratedRules:
    """:func:`~captum_relp.calibration.calibrated_ioi_rules` with ``default``; a failure is a
    :class:`~captum_relp.experiments.calibration_record.CalibrationFailed` naming the pairs."""
    with calibrating(f"{n_prompts} IOI pairs (seed {seed + 1})"):
        return calibrated_ioi_rules(model, tokenizer, n_prompts, seed=seed, exclude=exclude, default=default)


def run_ioi_experiment(
    model: nn.Module,
    tokenizer,
    n_prompts: int = 100,
    rules: Sequence[str] = ("relp",),
    batch_size: int = 25,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    ap_batch_size: int = 64,
    show_progress: bool = True,
    calibration_prompts: int = 20,
    name: Optional[str] = None,
    methods: Sequence[str] = ("AP", "AtP", "RelP"),
    calibrated: Optional[CalibratedRules] = None,
    calibrated_file: Optional[str] = None,
    checkpoint: Optional[Checkpoint] = None,
    calibration_default: Optional[str] = None,
) -> IOIExperimentResult:
    """Run AP, AtP and RelP on ``n_prompts`` IOI pairs and correlate them with AP.

    Args:
        model: a Hugging Face causal LM (GPT-2, Pythia, Llama, Qwen2, Gemma2 ...).
        tokenizer: its tokenizer; names that are not single tokens are filtered out.
        n_prompts: number of prompt pairs (the paper uses 100).
        rules: RelP presets to evaluate (``"relp"`` -> RelP, ``"relp-ah"`` -> RelP+AH), and
            ``"calibrated"``: rules chosen per component type by
            :func:`~captum_relp.calibration.calibrated_ioi_rules` on ``calibration_prompts``
            pairs disjoint from the evaluated ones (reported as ``RelP (calibrated)``).
        batch_size: prompts per attribution batch.
        seed: seed of the prompt generator.
        names: candidate names (default: the generator's list).
        ap_batch_size: patched copies per forward pass in activation patching.
        show_progress: progress bars.
        calibration_prompts: calibration pairs for ``"calibrated"``.
        name: the model's name in the results and figures (default:
            :func:`~captum_relp.models.model_name`, e.g. ``tiny-gpt2-ioi``, never a local path).
        methods: which of ``AP``, ``AtP``, ``RelP`` to run (``RelP``: the ``rules``).
            Without ``AP`` there is no reference: the correlations are NaN.
        calibrated: rules for ``"calibrated"`` calibrated earlier (e.g. read with
            :meth:`~captum_relp.CalibratedRules.load`): used as they are, no calibration is run.
        calibrated_file: the file ``calibrated`` was read from, named in ``config["calibration"]``.
        checkpoint: each method's scores of each batch are saved there as they finish, and read
            back when that entry is saved (:mod:`~captum_relp.experiments.checkpoint`: a checkpoint
            of another configuration raises ``CheckpointMismatch``). The calibration runs again
            on a resumed run; the wall times add the saved batches' times.
        calibration_default: the rule set each component type keeps in the calibration unless a
            candidate beats it beyond the noise (``default`` of
            :func:`~captum_relp.calibration.calibrate_rules`; ``None``: the best fixed preset). A calibration
            that cannot run raises ``CalibrationFailed``, a ``ValueError`` naming the calibration pairs.

    Returns:
        IOIExperimentResult

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> model, tokenizer = load_embedded()
        >>> result = run_ioi_experiment(model, tokenizer, n_prompts=2, show_progress=False)
        >>> sorted(result.pcc_per_prompt["mlp"])
        ['AtP', 'RelP']
    """
    label = name or model_name(model)
    device = next(model.parameters()).device
    pairs = generate_ioi_pairs(n_prompts, seed=seed, names=names, tokenizer=tokenizer)
    batch = encode_ioi(pairs, tokenizer, device=device)
    layers, flags, labels = model_components(model).select(KINDS)
    wanted = {m.lower() for m in methods}
    method_names = [m for m in ("AP", "AtP") if m.lower() in wanted]
    if "relp" not in wanted:
        rules, calibrated = (), None  # RelP is not run: no rules of any kind
    method_names += [get_method(preset).name for preset in rules if preset != "calibrated"]
    methods = {name: METHODS[name] for name in dict.fromkeys(method_names)}
    if calibrated is not None and "calibrated" not in rules:
        raise ValueError("calibrated rules were given but rules has no 'calibrated'")
    calibrates = "calibrated" in rules and calibrated is None
    if calibration_default is not None and not calibrates:
        raise ValueError("calibration_default applies only to a calibration in the run (RelP run with "
                         "rules 'calibrated', no calibrated rules given)")
    if checkpoint is not None:  # before any work: a checkpoint of another configuration stops the run here
        sweep = DataParallelSweep()
        checkpoint.open(run_fingerprint(
            model, experiment="ioi", pairs=pairs, batch=batch, methods=list(methods), rules=list(rules),
            calibration_prompts=calibration_prompts if "calibrated" in rules else 0, batch_size=batch_size,
            ap_batch_size=ap_batch_size, seed=seed, calibrated=None if calibrated is None else calibrated.to_json(),
            rank=sweep.rank, world_size=sweep.world_size,
            **({"calibration_default": calibration_default or "best-preset"} if calibrates else {})))
    calibration, calibrated_here = None, None
    if "calibrated" in rules and calibrated is not None:
        calibration = calibration_entry(calibrated, calibrated_file, loaded=True)
    elif "calibrated" in rules:
        began = time.perf_counter()
        calibrated = calibrated_here = _calibrate(model, tokenizer, calibration_prompts, seed, pairs,
                                                  calibration_default)
        record_calibration(calibrated, calibrated.info["calibration_pairs"], label, seed=seed + 1)
        calibration = calibration_entry(calibrated, CALIBRATION_FILE, time.perf_counter() - began)
    if calibrated is not None:
        methods[CALIBRATED] = Method(CALIBRATED, LayerRelevancePatching, "1 forward + 1 forward and "
                                     "backward per distinct chosen rule set", {"rules": calibrated})
    collected: Dict[str, List[List[torch.Tensor]]] = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    chunks = range(0, len(pairs), batch_size)
    sweep = DataParallelSweep()  # under torchrun: this rank's batches, gathered below
    for start in tqdm(sweep.shard(chunks), desc="IOI batches", disable=not show_progress):
        rows = slice(start, start + batch_size)
        clean, corrupt = batch.clean_ids[rows], batch.corrupt_ids[rows]
        kwargs = dict(
            baselines=corrupt, metric=batch.select(rows).metric(),
            additional_forward_args={"attention_mask": batch.attention_mask[rows]},
            attribute_to_layer_input=flags,
        )
        for name, method in methods.items():
            if name == "AP":  # per position already
                def compute(method=method, clean=clean, kwargs=kwargs):
                    return method.attribute(model, layers, clean, internal_batch_size=ap_batch_size,
                                            show_progress=show_progress, **kwargs)
            else:  # summed over hidden units in the backward pass, layer by layer
                def compute(method=method, clean=clean, kwargs=kwargs):
                    return method.attribute(model, layers, clean, reduce="sum", **kwargs)
            scores, spent = checkpointed(checkpoint, entry_key(name, start), compute)
            seconds[name] += spent
            collected[name].append(scores)

    collected = {m: sweep.gather(parts, len(chunks)) for m, parts in collected.items()}
    seconds = sweep.sum(seconds)
    by_method = {m: _stack(parts, labels) for m, parts in collected.items()}
    valid = batch.attention_mask.bool().cpu().numpy()
    layout = RoleLayout.from_roles(
        [ioi_token_roles(pair, tokenizer) for pair in pairs],
        [[tokenizer.decode([t]) for t in ids[: int(n)]] for ids, n in zip(batch.clean_ids.tolist(), valid.sum(1))])
    result = IOIExperimentResult(
        scores=by_method, valid=valid, pcc_per_prompt={}, pcc_mean_map={}, seconds=seconds,
        config={"n_prompts": len(pairs), "rules": list(rules), "seed": seed, "batch_size": batch_size,
                "model": label, "model_card": model_card(model),
                "templates": sorted({pair.template_id for pair in pairs}),
                "dtype": str(next(model.parameters()).dtype), "device": str(device),
                "n_layers": len(layers) // len(KINDS), "calibration": calibration},
        layout=layout, calibrated=calibrated_here,
    )
    mean_maps = result.mean_maps()
    if "AP" not in by_method:  # no reference to correlate with
        for table in (result.pcc_per_prompt, result.pcc_mean_map):
            table.update({kind: {m: float("nan") for m in methods} for kind in KINDS})
        return result
    mask = np.broadcast_to(valid[:, None, :], by_method["AP"]["mlp"].shape)
    for kind in KINDS:
        reference = by_method["AP"][kind]
        result.pcc_per_prompt[kind] = {
            m: pearson(by_method[m][kind][mask], reference[mask]) for m in methods if m != "AP"}
        result.pcc_mean_map[kind] = {
            m: pearson(mean_maps[m][kind], mean_maps["AP"][kind]) for m in methods if m != "AP"}
        others = [m for m in methods if m != "AP"]
        if others:
            result.agreement[kind] = agreement_table(reference, {m: by_method[m][kind] for m in others}, valid,
                                                     seed=seed, against="AtP" if "AtP" in others else others[0])
    return result


def _stack(parts: List[List[torch.Tensor]], labels) -> Dict[str, np.ndarray]:
    """Batches of per-layer ``(B, T)`` scores -> ``{kind: (N, layers, T)}``."""
    per_layer = [torch.cat([batch_scores[i] for batch_scores in parts]) for i in range(len(labels))]
    out = {}
    for kind in KINDS:
        out[kind] = torch.stack([s for s, (k, _) in zip(per_layer, labels) if k == kind], dim=1).numpy()
    return out


__all__ = ["IOIExperimentResult", "run_ioi_experiment", "pearson"]
