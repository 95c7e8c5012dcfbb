"""IOI faithfulness experiment (paper section 5.1, Table 5, Figure 2).

For N prompt pairs, AP, AtP and RelP scores of the residual stream entering each
block, the attention outputs and the MLP outputs, at every layer and position,
summed over the hidden dimension; Pearson correlation of AtP and RelP with AP.
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

from ..attr import METHODS, get_method
from ..models import COMPONENT_KINDS as KINDS
from ..models import COMPONENT_TITLES as KIND_TITLES
from ..models import model_components
from ..tasks.ioi import encode_ioi, generate_ioi_pairs


@dataclass
class IOIExperimentResult:
    """Scores and correlations of one IOI run.

    Attributes:
        scores: ``{method: {kind: array (N, layers, positions)}}`` (``AP``, ``AtP``, ``RelP``...).
        valid: ``(N, positions)`` boolean mask of real (non-pad) positions.
        pcc_per_prompt: ``{kind: {method: r}}`` over all per-prompt (layer, position) values.
        pcc_mean_map: ``{kind: {method: r}}`` over the prompt-averaged (layer x position) maps.
        seconds: wall time per method, measured in the same run.
        config: the run's settings.
        position_labels: tokens of the first clean prompt.
    """

    scores: Dict[str, Dict[str, np.ndarray]]
    valid: np.ndarray
    pcc_per_prompt: Dict[str, Dict[str, float]]
    pcc_mean_map: Dict[str, Dict[str, float]]
    seconds: Dict[str, float]
    config: Dict[str, object]
    position_labels: List[str] = field(default_factory=list)

    def mean_maps(self) -> Dict[str, Dict[str, np.ndarray]]:
        """``{method: {kind: (layers, positions)}}`` averaged over prompts at real positions."""
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
        for title, table in (("per-prompt maps", self.pcc_per_prompt),
                             ("prompt-averaged maps", self.pcc_mean_map)):
            lines.append(f"Pearson correlation with activation patching ({title}, N={self.config['n_prompts']})")
            lines.append(f"{'component':<20}" + "".join(f"{m:>10}" for m in methods))
            for kind in KINDS:
                lines.append(f"{KIND_TITLES[kind]:<20}" + "".join(f"{table[kind][m]:>10.3f}" for m in methods))
            lines.append("")
        ratios = self.time_ratios()
        lines.append("wall time (s) and ratio to AtP, measured in this run")
        for method, seconds in self.seconds.items():
            lines.append(f"{method:<20}{seconds:>10.2f}{ratios[method]:>9.2f}x")
        return "\n".join(lines)

    def save(self, out_dir: Path, plots: bool = True) -> List[Path]:
        """Write ``ioi_results.json``, ``ioi_pcc.csv`` and one heatmap PNG per component type."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / "ioi_results.json", out_dir / "ioi_pcc.csv"]
        summary = {
            "config": self.config, "pcc_per_prompt": self.pcc_per_prompt,
            "pcc_mean_map": self.pcc_mean_map, "seconds": self.seconds,
            "time_ratio_to_atp": self.time_ratios(), "position_labels": self.position_labels,
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
        if plots:
            from ..plotting import plot_patching_heatmaps

            maps = self.mean_maps()
            for kind in KINDS:
                path = out_dir / f"ioi_heatmap_{kind}.png"
                plot_patching_heatmaps({m: maps[m][kind] for m in maps}, KIND_TITLES[kind], path,
                                       self.position_labels)
                written.append(path)
        return written


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
) -> IOIExperimentResult:
    """Run AP, AtP and RelP on ``n_prompts`` IOI pairs and correlate them with AP.

    Args:
        model: a Hugging Face causal LM (GPT-2, Pythia, Llama, Qwen2, Gemma2 ...).
        tokenizer: its tokenizer; names that are not single tokens are filtered out.
        n_prompts: number of prompt pairs (the paper uses 100).
        rules: RelP presets to evaluate (``"relp"`` -> RelP, ``"relp-ah"`` -> RelP+AH).
        batch_size: prompts per attribution batch.
        seed: seed of the prompt generator.
        names: candidate names (default: the generator's list).
        ap_batch_size: patched copies per forward pass in activation patching.
        show_progress: progress bars.

    Returns:
        IOIExperimentResult

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> model, tokenizer = load_embedded()
        >>> result = run_ioi_experiment(model, tokenizer, n_prompts=2, show_progress=False)
        >>> sorted(result.pcc_per_prompt["mlp"])
        ['AtP', 'RelP']
    """
    device = next(model.parameters()).device
    pairs = generate_ioi_pairs(n_prompts, seed=seed, names=names, tokenizer=tokenizer)
    batch = encode_ioi(pairs, tokenizer, device=device)
    layers, flags, labels = model_components(model).select(KINDS)
    method_names = ["AP", "AtP"] + [get_method(preset).name for preset in rules]
    methods = {name: METHODS[name] for name in dict.fromkeys(method_names)}
    collected: Dict[str, List[List[torch.Tensor]]] = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    chunks = range(0, len(pairs), batch_size)
    for start in tqdm(chunks, desc="IOI batches", disable=not show_progress):
        rows = slice(start, start + batch_size)
        clean, corrupt = batch.clean_ids[rows], batch.corrupt_ids[rows]
        kwargs = dict(
            baselines=corrupt, metric=batch.select(rows).metric(),
            additional_forward_args={"attention_mask": batch.attention_mask[rows]},
            attribute_to_layer_input=flags,
        )
        for name, method in methods.items():
            began = time.perf_counter()
            if name == "AP":  # per position already
                scores = method.attribute(model, layers, clean, internal_batch_size=ap_batch_size, **kwargs)
            else:  # summed over hidden units in the backward pass, layer by layer
                scores = method.attribute(model, layers, clean, reduce="sum", **kwargs)
            seconds[name] += time.perf_counter() - began
            collected[name].append([s.float().cpu() for s in scores])

    by_method = {m: _stack(parts, labels) for m, parts in collected.items()}
    valid = batch.attention_mask.bool().cpu().numpy()
    result = IOIExperimentResult(
        scores=by_method, valid=valid, pcc_per_prompt={}, pcc_mean_map={}, seconds=seconds,
        config={"n_prompts": len(pairs), "rules": list(rules), "seed": seed, "batch_size": batch_size,
                "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
                "dtype": str(next(model.parameters()).dtype), "device": str(device),
                "n_layers": len(layers) // len(KINDS)},
        position_labels=list(batch.positions),
    )
    mean_maps = result.mean_maps()
    mask = np.broadcast_to(valid[:, None, :], by_method["AP"]["mlp"].shape)
    for kind in KINDS:
        reference = by_method["AP"][kind]
        result.pcc_per_prompt[kind] = {
            m: pearson(by_method[m][kind][mask], reference[mask]) for m in methods if m != "AP"}
        result.pcc_mean_map[kind] = {
            m: pearson(mean_maps[m][kind], mean_maps["AP"][kind]) for m in methods if m != "AP"}
    return result


def _stack(parts: List[List[torch.Tensor]], labels) -> Dict[str, np.ndarray]:
    """Batches of per-layer ``(B, T)`` scores -> ``{kind: (N, layers, T)}``."""
    per_layer = [torch.cat([batch_scores[i] for batch_scores in parts]) for i in range(len(labels))]
    out = {}
    for kind in KINDS:
        out[kind] = torch.stack([s for s, (k, _) in zip(per_layer, labels) if k == kind], dim=1).numpy()
    return out


__all__ = ["IOIExperimentResult", "run_ioi_experiment", "pearson"]
