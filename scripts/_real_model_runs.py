"""Checkpointed SmolLM2-135M measurements of ``make_results.py --real-model --task ...``.

Each task (IOI, SVA) has *evaluated* pairs (the Table-5 rows; seed 0) and a disjoint
*calibration pool* (seed 1, any pair whose clean prompt is evaluated is skipped). Work runs
in chunks of ``CHUNK`` pairs; a chunk saves AP at the task's positions, AtP / RelP /
RelP+AH and every default calibration candidate (one RelP pass each; ``gradient``,
``relp`` and ``relp-ah`` are the AtP / RelP / RelP+AH passes, not rerun) read at the same
positions, and the wall time of each, to ``parts/<task>_<split>_<start>.npz``. The chunks are
the entries of the library's checkpoint (:class:`~captum_relp.experiments.checkpoint.Checkpoint`,
named after the task, fingerprint in ``parts/<task>.checkpoint.json``: the GGUF file's sha256,
the chunk size, the positions read, the seeds); a rerun resumes it and skips finished chunks, so
a run that is stopped keeps what it measured, and a rerun with another model or layout is
refused instead of mixed in. The page uses the leading finished chunks of each split.

Order of the chunks: evaluated 0-40, pool 0-20, evaluated 40-100, pool 20-50, pool 50-100
(the Table-5 rows first, then enough pool pairs for a calibrated row, then the rest).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from _real_model import candidate_scores, check_against_library, gradient_scores, layered_role_patching, pick, role_patching
from captum_relp.calibration.calibrated_rules import default_candidates
from captum_relp.embedded.gguf import model_card
from captum_relp.experiments.checkpoint import Checkpoint
from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs, ioi_token_roles
from captum_relp.tasks.sva import encode_sva, generate_sva_pairs

CHUNK = 10
IOI_ROLES = ("S1", "IO", "S2", "END")
SVA_STRUCTURE = "across_rc"
SVA_LABELS = ("subject", "that", "the", "RC noun", "RC verb")
"""Positions 1-5 of ``The officer that the editors help``; position 0 (``The``) is the same
token in both prompts, so every method gives it exactly 0 there and it is left out."""
REUSED = {"gradient": "AtP", "relp": "RelP", "relp-ah": "RelP+AH"}
"""Candidates whose scores are the library method's (same rules, same pass)."""


def chunks_of(model, folder: Path, task: str) -> Checkpoint:
    """The checkpoint of ``task``'s chunks in ``folder/parts`` (opened: a rerun resumes it)."""
    card = model_card(model)
    if card is None or "sha256" not in card:
        raise ValueError("the real-model runs record the GGUF file's sha256: load the model with load_model")
    chunks = Checkpoint(folder / "parts", task, resume=True, compress=True)
    chunks.open(chunk_fingerprint(card["sha256"], str(next(model.parameters()).dtype), task))
    return chunks


def chunk_fingerprint(sha256: str, dtype: str, task: str) -> Dict[str, object]:
    """What decides a chunk's numbers: the model file and dtype, the task's layout, the chunk size, the seeds."""
    return {"model_sha256": sha256, "dtype": dtype, "task": task, "chunk": CHUNK,
            "positions": list(IOI_ROLES if task == "ioi" else SVA_LABELS),
            "structure": None if task == "ioi" else SVA_STRUCTURE, "seeds": {"eval": 0, "pool": 1}}


def _pairs(task: str, n: int, seed: int, tokenizer, avoid=frozenset()) -> list:
    extra = n + len(avoid) + 20
    if task == "ioi":
        made = generate_ioi_pairs(extra, seed=seed, tokenizer=tokenizer)
    else:
        made = generate_sva_pairs(extra, SVA_STRUCTURE, seed=seed, tokenizer=tokenizer)
    kept, seen = [], set(avoid)
    for pair in made:
        if pair.clean_prompt not in seen:
            kept.append(pair)
            seen.add(pair.clean_prompt)
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} distinct {task} pairs for seed {seed}, {n} asked")
    return kept[:n]


def task_split(task: str, split: str, n_eval: int, n_pool: int, tokenizer) -> Tuple[object, List[List[int]], list]:
    """The batch, the positions read and the pairs of one split (``eval`` or ``pool``)."""
    evaluated = _pairs(task, n_eval, 0, tokenizer)
    pairs = evaluated if split == "eval" else _pairs(task, n_pool, 1, tokenizer,
                                                     frozenset(p.clean_prompt for p in evaluated))
    if task == "ioi":
        roles = [ioi_token_roles(pair, tokenizer) for pair in pairs]
        return encode_ioi(pairs, tokenizer), [[r.index(x) for x in IOI_ROLES] for r in roles], pairs
    return encode_sva(pairs, tokenizer), [list(range(1, 1 + len(SVA_LABELS)))] * len(pairs), pairs


def schedule(n_eval: int, n_pool: int) -> List[Tuple[str, int]]:
    """``(split, start)`` of every chunk, in the order they run (see the module docstring)."""
    def chunks(split, lo, hi):
        return [(split, s) for s in range(lo, hi, CHUNK)]
    first = min(n_eval, 40)
    return (chunks("eval", 0, first) + chunks("pool", 0, min(n_pool, 20)) + chunks("eval", first, n_eval)
            + chunks("pool", min(n_pool, 20), min(n_pool, 50)) + chunks("pool", min(n_pool, 50), n_pool))


def measure(model, tokenizer, folder: Path, task: str, n_eval: int, n_pool: int,
            stop_at: Optional[float] = None, split: Optional[str] = None) -> None:
    """Run every unfinished chunk of ``task`` (of ``split`` only, if given; until the clock passes ``stop_at``)."""
    parts = folder / "parts"
    chunks = chunks_of(model, folder, task)
    candidates = [c for c in default_candidates(model) if c.name not in REUSED]
    splits = {s: task_split(task, s, n_eval, n_pool, tokenizer) for s in ("eval", "pool")}
    check_file = parts / f"{task}_check.json"
    if not check_file.exists():
        began = time.perf_counter()
        diff = check_against_library(model, splits["eval"][0], splits["eval"][1][0])
        check_file.write_text(json.dumps({"max_abs_diff": diff, "seconds": time.perf_counter() - began}))
    layered_file = parts / f"{task}_layered_check.json"
    if not layered_file.exists():  # the AP used from here on against the copy-per-component one, prompt 0
        one, where = splits["eval"][0].select(slice(0, 1)), splits["eval"][1][:1]
        began = time.perf_counter()
        plain = role_patching(model, one, where)
        middle = time.perf_counter()
        layered = layered_role_patching(model, one, where)
        layered_file.write_text(json.dumps({"max_abs_diff": float(np.abs(plain - layered).max()),
                                            "max_abs_effect": float(np.abs(plain).max()),
                                            "seconds_plain": middle - began,
                                            "seconds_layered": time.perf_counter() - middle}))
    for part, start in schedule(n_eval, n_pool):
        key = f"{part}_{start:03d}"
        if key in chunks.entries() or (split is not None and part != split):
            continue
        if stop_at is not None and time.time() > stop_at:
            print(f"{task}: stopped before {part} {start} (time limit)", flush=True)
            return
        batch, positions, pairs = splits[part]
        stop = min(start + CHUNK, len(pairs))
        rows, where = batch.select(slice(start, stop)), positions[start:stop]
        with torch.no_grad():
            metric = rows.metric()(model(rows.clean_ids, attention_mask=rows.attention_mask).logits)
        gradient, seconds = gradient_scores(model, rows)
        cands, cand_seconds = candidate_scores(model, rows, candidates if part == "pool" else [])
        began = time.perf_counter()
        arrays = {"AP": layered_role_patching(model, rows, where)}
        seconds = {"AP": time.perf_counter() - began, **seconds, **{f"cand:{k}": v for k, v in cand_seconds.items()}}
        arrays.update({m: pick(v, where) for m, v in gradient.items()})
        arrays.update({f"cand:{k}": pick(v, where) for k, v in cands.items()})
        chunks.save(key, {"metric": metric.double().numpy(), "seconds": json.dumps(seconds),  # whole or not at all
                          "prompts": np.array([p.clean_prompt for p in pairs[start:stop]]), **arrays})
        print(f"{time.strftime('%H:%M:%S')} {task} {part} {start}-{stop}: AP {seconds['AP']:.0f} s, "
              f"AtP {seconds['AtP']:.1f} s, {len(cands)} more candidates {sum(cand_seconds.values()):.0f} s",
              flush=True)


def load_split(model, folder: Path, task: str, split: str) -> Optional[Dict[str, object]]:
    """The leading finished chunks of a split, concatenated: arrays, metric, prompts and summed seconds."""
    chunks = chunks_of(model, folder, task)
    parts, start = [], 0
    while (part := chunks.load(f"{split}_{start:03d}")) is not None:
        parts.append(part)
        start += CHUNK
    if not parts:
        return None
    names = [k for k in parts[0] if k not in ("metric", "seconds", "prompts")]
    seconds: Dict[str, float] = {}
    for part in parts:
        for k, v in json.loads(str(part["seconds"])).items():
            seconds[k] = seconds.get(k, 0.0) + v
    scores = {k: np.concatenate([p[k] for p in parts]) for k in names}
    for extra in [k for k in chunks.entries() if k.startswith(f"{split}_000_cand_")]:
        name = extra.split("_cand_", 1)[1]
        loaded = [chunks.load(f"{split}_{s:03d}_cand_{name}") for s in range(0, start, CHUNK)]
        if all(x is not None for x in loaded):
            scores[f"cand:{name}"] = np.concatenate([x["scores"] for x in loaded])
            seconds[f"cand:{name}"] = sum(float(x["seconds"]) for x in loaded)
    for cand, method in REUSED.items():
        scores[f"cand:{cand}"] = scores[method]
    return {"scores": scores, "metric": np.concatenate([p["metric"] for p in parts]),
            "prompts": [str(s) for p in parts for s in p["prompts"]], "seconds": seconds}


def fill_candidates(model, tokenizer, folder: Path, task: str, names, n_eval: int, n_pool: int) -> None:
    """Score candidates ``names`` on the finished evaluated chunks that lack them (the chosen ones only)."""
    todo = [c for c in default_candidates(model) if c.name in set(names) and c.name not in REUSED]
    if not todo:
        return
    batch, positions, _ = task_split(task, "eval", n_eval, n_pool, tokenizer)
    chunks, start = chunks_of(model, folder, task), 0
    while (stored := chunks.load(f"eval_{start:03d}")) is not None:
        rows, where = batch.select(slice(start, start + CHUNK)), positions[start:start + CHUNK]
        for candidate in todo:
            key = f"eval_{start:03d}_cand_{candidate.name}"
            if key not in chunks.entries() and f"cand:{candidate.name}" not in stored:
                scores, seconds = candidate_scores(model, rows, [candidate])
                chunks.save(key, {"scores": pick(scores[candidate.name], where), "seconds": seconds[candidate.name]})
        start += CHUNK
