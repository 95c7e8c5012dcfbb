"""Table-5 measurement on a real model (helpers of ``make_results.py --real-model``).

Activation patching (AP) of all 3 x L components (residual stream entering each block,
attention output, MLP output) at chosen token positions, one prompt at a time: for a
position ``t`` the prompt's clean key/value cache up to ``t`` is reused and one forward
of the suffix runs ``3 L`` copies at once, copy ``k`` with component ``k`` patched at
``t`` from the corrupted prompt. Exact activation patching (checked in the run against
:class:`captum_relp.LayerActivationPatching` on the first prompt), cheaper than the
library's per-layer loop on a model this size. AtP, RelP and RelP+AH come from the
library at every position and are read at the same positions.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from captum_relp import LayerActivationPatching
from captum_relp.attr import METHODS
from captum_relp.models import COMPONENT_KINDS as KINDS
from captum_relp.models import model_components


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _capture(model, layers, flags, ids) -> List[torch.Tensor]:
    """Activation of every component on one prompt, ``(T, d)`` each."""
    seen: List[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
    handles = []
    for k, (layer, flag) in enumerate(zip(layers, flags)):
        if flag:
            def pre(module, args, kwargs, k=k):
                seen[k] = (args[0] if args else kwargs["hidden_states"])[0].detach()
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, out, k=k):
                seen[k] = _first(out)[0].detach()
            handles.append(layer.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _patched_suffix(model, layers, flags, suffix, cache, corrupt_at_t) -> torch.Tensor:
    """Logits at the last position of ``len(layers)`` copies of the suffix, copy k patched at layer k."""
    n = len(layers)
    handles = []

    def patch(tensor, k):
        tensor = tensor.clone()
        tensor[k, 0] = corrupt_at_t[k].to(tensor.dtype)
        return tensor

    for k, (layer, flag) in enumerate(zip(layers, flags)):
        if flag:
            def pre(module, args, kwargs, k=k):
                if args:
                    return (patch(args[0], k),) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": patch(kwargs["hidden_states"], k)}
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, out, k=k):
                if isinstance(out, tuple):
                    return (patch(out[0], k),) + tuple(out[1:])
                return patch(out, k)
            handles.append(layer.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(suffix.expand(n, -1), cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits


def role_patching(model, batch, positions: Sequence[Sequence[int]]) -> np.ndarray:
    """AP effects ``(N, components, len(positions[i]))``: m(clean) - m(clean, component patched at t).

    Args:
        model: a Hugging Face causal LM with a key/value cache.
        batch: an IOI or SVA batch (right-padded; each prompt is run unpadded).
        positions: for each prompt, the positions to patch.
    """
    layers, flags, _ = model_components(model).select(KINDS)
    n = len(layers)
    lengths = batch.attention_mask.sum(1).tolist()
    out = np.zeros((len(positions), n, max(len(p) for p in positions)))
    for i, wanted in enumerate(positions):
        length = int(lengths[i])
        clean, corrupt = batch.clean_ids[i : i + 1, :length], batch.corrupt_ids[i : i + 1, :length]
        corrupt_acts = _capture(model, layers, flags, corrupt)
        with torch.no_grad():
            prefix = model(clean, use_cache=True)
        one = batch.select(slice(i, i + 1))
        clean_value = float(one.metric()(prefix.logits))
        copies = batch.select(torch.full((n,), i, dtype=torch.long))
        for j, t in enumerate(wanted):
            cache = copy.deepcopy(prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values)
            cache.crop(t - length)  # keep the first t positions
            cache.batch_repeat_interleave(n)
            logits = _patched_suffix(model, layers, flags, clean[:, t:], cache,
                                     [acts[t] for acts in corrupt_acts])
            patched = copies.metric()(logits.expand(n, length, logits.shape[-1]))
            out[i, :, j] = clean_value - patched.double().numpy()
    return out


def check_against_library(model, batch, positions: Sequence[int], picks=(("resid", 5), ("attn", 13), ("mlp", 22))):
    """Max |difference| between :func:`role_patching` and LayerActivationPatching on prompt 0."""
    layers, flags, labels = model_components(model).select(KINDS)
    index = [labels.index(p) for p in picks]
    one = batch.select(slice(0, 1))
    library = LayerActivationPatching(model, [layers[k] for k in index]).attribute(
        one.clean_ids, baselines=one.corrupt_ids, metric=one.metric(),
        additional_forward_args={"attention_mask": one.attention_mask},
        attribute_to_layer_input=[flags[k] for k in index])
    mine = role_patching(model, one, [list(positions)])[0]
    return max(float(np.abs(library[j][0, list(positions)].double().numpy() - mine[k]).max())
               for j, k in enumerate(index))


def gradient_scores(model, batch, batch_size: int = 8) -> Dict[str, np.ndarray]:
    """AtP, RelP and RelP+AH at every position: ``{method: (N, components, T)}``, and their wall times."""
    layers, flags, _ = model_components(model).select(KINDS)
    scores: Dict[str, List[np.ndarray]] = {m: [] for m in ("AtP", "RelP", "RelP+AH")}
    seconds = {m: 0.0 for m in scores}
    for start in range(0, len(batch), batch_size):
        rows = batch.select(slice(start, start + batch_size))
        kwargs = dict(baselines=rows.corrupt_ids, metric=rows.metric(),
                      additional_forward_args={"attention_mask": rows.attention_mask},
                      attribute_to_layer_input=flags, reduce="sum")
        for name in scores:
            began = time.perf_counter()
            values = METHODS[name].attribute(model, layers, rows.clean_ids, **kwargs)
            seconds[name] += time.perf_counter() - began
            scores[name].append(torch.stack([v.float() for v in values], 1).numpy())
    return {m: np.concatenate(v) for m, v in scores.items()}, seconds


def pick(values: np.ndarray, positions: Sequence[Sequence[int]]) -> np.ndarray:
    """``(N, C, T)`` -> ``(N, C, P)`` at each prompt's positions."""
    return np.stack([values[i][:, list(p)] for i, p in enumerate(positions)])


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 1000,
              seed: int = 0) -> List[float]:
    """Percentile 95% interval of ``statistic(rows)`` over prompts resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(resamples)]
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def pcc_tables(scores: Dict[str, np.ndarray], n_layers: int, resamples: int = 1000) -> Dict[str, dict]:
    """Per-prompt and prompt-averaged PCC with AP, per component type, with bootstrap intervals.

    ``scores``: ``{method: (N, 3 L, P)}`` with ``AP`` among the methods; components in the
    order resid 0..L-1, attn 0..L-1, mlp 0..L-1.
    """
    n = scores["AP"].shape[0]
    tables: Dict[str, dict] = {"per_prompt": {}, "prompt_averaged": {}}
    for k, kind in enumerate(KINDS):
        part = {m: v[:, k * n_layers : (k + 1) * n_layers] for m, v in scores.items()}
        tables["per_prompt"][kind], tables["prompt_averaged"][kind] = {}, {}
        for method in part:
            if method == "AP":
                continue
            def per_prompt(rows, m=method):
                return pearson(part[m][rows], part["AP"][rows])

            def averaged(rows, m=method):
                return pearson(part[m][rows].mean(0), part["AP"][rows].mean(0))

            every = np.arange(n)
            tables["per_prompt"][kind][method] = [per_prompt(every)] + bootstrap(per_prompt, n, resamples)
            tables["prompt_averaged"][kind][method] = [averaged(every)] + bootstrap(averaged, n, resamples)
    return tables


def run_task(model, batch, positions: Sequence[Sequence[int]], resamples: int = 1000) -> dict:
    """AP at ``positions`` and AtP / RelP / RelP+AH read there; PCC tables, mean maps, wall times."""
    with torch.no_grad():
        values = batch.metric()(model(batch.clean_ids, attention_mask=batch.attention_mask).logits)
    layers = len(model_components(model).blocks)
    began = time.perf_counter()
    check = check_against_library(model, batch, positions[0])
    check_seconds = time.perf_counter() - began
    gradient, seconds = gradient_scores(model, batch)
    scores = {m: pick(v, positions) for m, v in gradient.items()}
    began = time.perf_counter()
    scores["AP"] = role_patching(model, batch, positions)
    seconds = {"AP": time.perf_counter() - began, **seconds}
    means = {m: {kind: v[:, k * layers : (k + 1) * layers].mean(0) for k, kind in enumerate(KINDS)}
             for m, v in scores.items()}
    return {"n": len(positions), "metric_mean": float(values.mean()), "solved": float((values > 0).float().mean()),
            "pcc": pcc_tables(scores, layers, resamples), "seconds": seconds,
            "check_max_abs_diff": check, "check_seconds": check_seconds, "mean_maps": means,
            "per_prompt_scores": scores}
