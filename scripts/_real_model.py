"""Table-5 measurement on a real model (helpers of ``make_results.py --real-model``).

Activation patching (AP) of all 3 x L components (residual stream entering each block,
attention output, MLP output) at chosen token positions, one prompt at a time: for a
position ``t`` the prompt's clean key/value cache up to ``t`` is reused and one forward
of the suffix runs ``3 L`` copies at once, copy ``k`` with component ``k`` patched at
``t`` from the corrupted prompt (:func:`role_patching`); :func:`layered_role_patching`
also skips the blocks below each copy's patched layer (Llama-style decoders; 1.4-1.6x
faster on SmolLM2-135M). Exact activation patching (checked in the run against
:class:`captum_relp.LayerActivationPatching` on the first prompt, and the two against
each other), cheaper than the library's per-layer loop on a model this size. AtP, RelP,
RelP+AH and the calibration candidates come from the library at every position and are
read at the same positions.
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


def sized_card(model) -> Dict:
    """The GGUF model card plus ``layers`` and ``parameters`` (the models table on the results page reads them)."""
    from captum_relp.embedded.gguf import model_card

    return {**model_card(model), "layers": model.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters())}


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


def candidate_scores(model, batch, candidates, batch_size: int = 8):
    """RelP with each rule set of ``candidates`` at every position: ``{name: (N, components, T)}``, wall times."""
    from captum_relp.attr import LayerRelevancePatching
    from captum_relp.calibration.calibrated_rules import explicit_ruleset

    layers, flags, _ = model_components(model).select(KINDS)
    scores: Dict[str, List[np.ndarray]] = {c.name: [] for c in candidates}
    seconds = {c.name: 0.0 for c in candidates}
    for start in range(0, len(batch), batch_size):
        rows = batch.select(slice(start, start + batch_size))
        for candidate in candidates:
            began = time.perf_counter()
            values = LayerRelevancePatching(model, layers, rules=explicit_ruleset(candidate)).attribute(
                rows.clean_ids, baselines=rows.corrupt_ids, metric=rows.metric(),
                additional_forward_args={"attention_mask": rows.attention_mask},
                attribute_to_layer_input=flags, reduce="sum")
            seconds[candidate.name] += time.perf_counter() - began
            scores[candidate.name].append(torch.stack([v.float() for v in values], 1).numpy())
    return {m: np.concatenate(v) for m, v in scores.items()}, seconds


class _PrefixCache:
    """The clean prompt's keys/values before position ``t``, shared by every copy (a minimal cache)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def update(self, key, value, layer_idx, kwargs=None):
        n = key.shape[0]
        return (torch.cat([self.keys[layer_idx].expand(n, -1, -1, -1), key], 2),
                torch.cat([self.values[layer_idx].expand(n, -1, -1, -1), value], 2))


def layered_role_patching(model, batch, positions: Sequence[Sequence[int]]) -> np.ndarray:
    """:func:`role_patching` with the blocks below each patched layer run once (Llama-style decoders).

    The copy patched at block ``l`` equals the clean run below ``l``, so block ``b`` runs only
    the ``3 (b + 1)`` copies patched at or below it, starting from the clean hidden states of
    the suffix: about half the block passes. Same effects as :func:`role_patching` up to
    float rounding (checked in the run).
    """
    comps = model_components(model)
    blocks, attn, mlp = list(comps.blocks), list(comps.attn), list(comps.mlp)
    n_layers = len(blocks)
    layers, flags, _ = comps.select(KINDS)
    inner = model.model
    lengths = batch.attention_mask.sum(1).tolist()
    out = np.zeros((len(positions), 3 * n_layers, max(len(p) for p in positions)))
    for i, wanted in enumerate(positions):
        length = int(lengths[i])
        clean, corrupt = batch.clean_ids[i : i + 1, :length], batch.corrupt_ids[i : i + 1, :length]
        corrupt_acts = _capture(model, layers, flags, corrupt)
        with torch.no_grad():
            prefix = model(clean, use_cache=True, output_hidden_states=True)
        kv = prefix.past_key_values if getattr(prefix, "past_key_values", None) is not None else prefix.cache
        clean_value = float(batch.select(slice(i, i + 1)).metric()(prefix.logits))
        copies = batch.select(torch.full((3 * n_layers,), i, dtype=torch.long))
        for j, t in enumerate(wanted):
            q = length - t
            cache = _PrefixCache([layer.keys[:, :, :t] for layer in kv.layers], [layer.values[:, :, :t] for layer in kv.layers])
            position_ids = torch.arange(t, length).unsqueeze(0)
            hidden = prefix.hidden_states[0][:, t:]
            cos_sin = inner.rotary_emb(hidden, position_ids)
            mask = torch.zeros(1, 1, q, length, dtype=hidden.dtype).masked_fill(
                torch.arange(length)[None, :] > position_ids[0, :, None], torch.finfo(hidden.dtype).min)
            state = hidden[:0]
            order: List[int] = []
            for b in range(n_layers):
                fresh = prefix.hidden_states[b][:, t:].expand(3, -1, -1).clone()
                fresh[0, 0] = corrupt_acts[b][t]
                state = torch.cat([state, fresh])
                order += [b, n_layers + b, 2 * n_layers + b]
                row = len(order) - 3

                def patcher(copy, component):
                    def hook(module, args, output):
                        value = _first(output).clone()
                        value[copy, 0] = corrupt_acts[component][t]
                        return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value
                    return hook
                handles = [attn[b].register_forward_hook(patcher(row + 1, n_layers + b)),
                           mlp[b].register_forward_hook(patcher(row + 2, 2 * n_layers + b))]
                try:
                    with torch.no_grad():
                        state = _first(blocks[b](state, attention_mask=mask, position_ids=position_ids, cache=cache,
                                                 position_embeddings=cos_sin))
                finally:
                    for handle in handles:
                        handle.remove()
            with torch.no_grad():
                logits = model.lm_head(inner.norm(state[:, -1:]))
            logits = logits[torch.as_tensor(np.argsort(order))]
            patched = copies.metric()(logits.expand(3 * n_layers, length, logits.shape[-1]))
            out[i, :, j] = clean_value - patched.double().numpy()
    return out
