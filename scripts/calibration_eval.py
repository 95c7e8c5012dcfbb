"""Held-out evaluation of calibrated rules, and of the calibration size.

For each model, AP and every default candidate rule set are run once on a pool of
``--n-pool`` calibration pairs plus ``--n-eval`` held-out pairs. For each calibration size
(10, 20, 50, 100 by default) the rules are chosen (noise-aware, :func:`choose_rules`) on a
subset of the pool (draw 0: the first pairs; further draws: random subsets), twice from the
same scores: with the library's default (``"best-preset"``: per component type the fixed preset,
AtP's gradient, ``relp`` or ``relp-ah``, that agrees best with AP on the calibration subset is kept
unless a candidate beats it beyond the noise) and with the previous default (the gradient). Each
choice is then compared on the held-out pairs: the Pearson correlation with exact activation
patching (per example, layer and real position; scores summed over the hidden dimension) of AtP,
RelP with the paper preset, RelP+AH and RelP with the calibrated rules, and paired bootstrap
intervals over the held-out pairs of "calibrated minus AtP" and of "calibrated minus the best
preset" (the best of AtP, RelP and RelP+AH on the held-out pairs). A calibrated RelP score of a
layer is its chosen candidate's score (RelP scores of a layer do not depend on the other layers
attributed in the same pass).

Models: the two shipped models on IOI, and tiny random-weight models of several
families whose weights are rescaled so that the inputs of normalisation and
activation modules have std ~2 (strong nonlinearities, where presets disagree),
on random token pairs with a logit-difference metric at the last position (encoders too:
their masked-LM logits there). ``--families`` builds the script's own 3-layer configs;
``--tiny-families`` (``rest``: every family-table family without a script config) builds the
family tests' tiny configs (``tests/families/configs.py``), every component type the family
has (OPT: no MLP output, refused by the table and listed so on the page).

Rows: with ``--rows-dir``, every measured model is written as one JSON row file there, and the
page (``--markdown``) shows every row file of the directory, combined by model name (see
``_calibration_rows.py``). E.g. every row of the page in two processes (one per core), then the
page from every row file, then the summary pages (``results_pages.py``):

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/calibration_eval.py --shipped tiny-gpt2-ioi
        --families gpt2 gpt_neox llama --no-smollm --rows-dir docs/_static/results/calibration
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/calibration_eval.py --shipped tiny-llama-ioi
        --families qwen2 gemma2 bert --tiny-families rest --no-smollm --rows-dir docs/_static/results/calibration
    PYTHONPATH=. python scripts/calibration_eval.py --from-json docs/_static/results/calibration
        --markdown docs/results_calibration.md
    python scripts/results_pages.py

(one command each). SmolLM2-135M is measured when its converted directory exists (``--no-smollm``
skips it; hours of CPU); its row joins the others the same way. The SmolLM2-135M rows of the
summary page come from its own study instead (``make_results.py --real-model``: AP at the task's
positions only, both defaults, this module's :func:`study`).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import transformers
from torch import nn

from captum_relp import model_components
from captum_relp.calibration import (
    CandidateScores,
    bootstrap_interval,
    choose_rules,
    paired_bootstrap,
    score_candidates,
)
from captum_relp.calibration.calibrate import BEST_PRESET
from captum_relp.embedded import heldout_words, load_embedded
from captum_relp.embedded.fetch import fetched_model_path
from captum_relp.families import FAMILY_TABLE
from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs

import _calibration_rows as rows_io
import _calibration_tables as tables

KINDS = ("resid", "attn", "mlp")
VOCAB = 64
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "bert")
CALIBRATED = "RelP (calibrated)"
PRESETS = {"AtP": "gradient", "RelP (preset)": "relp", "RelP+AH": "relp-ah"}
"""The fixed presets compared on the held-out pairs: column name -> candidate name."""
METHODS = (*PRESETS, CALIBRATED)
DEFAULTS = (BEST_PRESET, "gradient")
"""The defaults every study run is chosen with, from the same candidate scores: the library's
(the best preset) and the previous one (the gradient, AtP)."""
SMOLLM = fetched_model_path("smollm2-135m")


def random_model(family: str, seed: int, n_layers: int = 3, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, max_position_embeddings=32)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=n_layers, n_embd=hidden, n_head=4, n_positions=32,
                                         vocab_size=VOCAB)
        cls = transformers.GPT2LMHeadModel
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                                            intermediate_size=2 * hidden, **common)
        cls = transformers.GPTNeoXForCausalLM
    elif family in ("llama", "qwen2"):
        cfg_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        config = cfg_cls(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * hidden, **common)
        cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    elif family == "gemma2":
        config = transformers.Gemma2Config(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, intermediate_size=2 * hidden,
                                           sliding_window=8, query_pre_attn_scalar=8, **common)
        config._attn_implementation = "eager"
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                                         intermediate_size=2 * hidden, **common)
        cls = transformers.BertForMaskedLM
    model = cls(config).eval()
    if family == "gemma2":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.3)
    return model


def tiny_family_model(family: str, seed: int) -> nn.Module:
    """The family tests' tiny random model of ``family`` (float32, this script's vocabulary)."""
    from tests.families.configs import tiny_model

    return tiny_model(family, dtype=torch.float32, seed=seed, vocab_size=VOCAB)


def _input_stds(model: nn.Module, ids: torch.Tensor, kind: str) -> List[float]:
    """Std of the inputs of every normalisation (kind='norm') or activation module."""
    stds, handles = [], []
    family = FAMILY_TABLE.get(getattr(getattr(model, "config", None), "model_type", None))
    own_activations = family.activations if family is not None else ()
    for module in model.modules():
        name = type(module).__name__
        is_norm = "Norm" in name and "Normal" not in name
        is_act = (type(module).__module__ in ("transformers.activations", "torch.nn.modules.activation")
                  and name not in ("Softmax", "Tanh")) or name in own_activations
        if (kind == "norm" and is_norm) or (kind == "act" and is_act):
            handles.append(module.register_forward_pre_hook(lambda m, a: stds.append(float(a[0].std()))))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return stds


def strengthen(model: nn.Module, ids: torch.Tensor, target: float = 2.0, rounds: int = 3,
               norms: bool = True) -> Dict[str, float]:
    """Rescale weights so that norm and activation inputs have std ~``target``.

    Activation inputs: every linear weight inside the MLPs is scaled. Norm inputs (the
    residual stream): the embeddings and the attention / MLP output projections are scaled
    (not with ``norms=False``: models whose norms only act on sublayer outputs, where these
    factors do not reach the norm inputs and the iteration collapses to zero).
    """
    comps = model_components(model)
    mlp_linears = [m for block in comps.blocks for m in block.modules()
                   if isinstance(m, (nn.Linear, transformers.pytorch_utils.Conv1D))
                   and any(m is x for mlp in _mlp_modules(block) for x in mlp.modules())]
    for _ in range(rounds):
        act = _input_stds(model, ids, "act")
        if act:
            factor = target / (sum(act) / len(act))
            with torch.no_grad():
                for lin in mlp_linears:
                    lin.weight.mul_(factor)
        norm = _input_stds(model, ids, "norm")
        if not norms:
            continue
        factor = target / (sum(norm) / len(norm))
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    module.weight.mul_(factor)
            for out in list(comps.attn) + list(comps.mlp):
                _output_linear(out).weight.mul_(factor)
    act, norm = _input_stds(model, ids, "act"), _input_stds(model, ids, "norm")
    return {"act_std": sum(act) / max(len(act), 1), "norm_std": sum(norm) / max(len(norm), 1)}


def _output_linear(module: nn.Module) -> nn.Module:
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return module
    return [m for m in module.modules() if isinstance(m, (nn.Linear, transformers.pytorch_utils.Conv1D))][-1]


def _mlp_modules(block: nn.Module) -> List[nn.Module]:
    return [m for name, m in block.named_children()
            if name in ("mlp", "feed_forward", "intermediate", "output", "ffn", "fc1", "fc2")]


def random_pairs(n: int, seq: int, seed: int, n_diff: int = 2):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, VOCAB, (n, seq), generator=gen)
    corrupt = clean.clone()
    for row in range(n):
        positions = torch.randperm(seq - 1, generator=gen)[:n_diff]
        corrupt[row, positions] = torch.randint(3, VOCAB, (n_diff,), generator=gen)
    return clean, corrupt


def logit_diff(out: torch.Tensor) -> torch.Tensor:
    return out[:, -1, 1] - out[:, -1, 2]


def held_out_bootstrap(held: CandidateScores, n_bootstrap: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per group, every candidate's PCC with AP on all held-out pairs and on paired resamples (seed 1)."""
    return {group: paired_bootstrap(d.reference, d.scores, d.mask, n_bootstrap=n_bootstrap, seed=1)
            for group, d in held.data.items()}


def _finite(value: torch.Tensor) -> Optional[float]:
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def held_out(boot: Dict[str, Dict[str, torch.Tensor]], choices: Dict[str, str]) -> Dict[str, Dict]:
    """Held-out PCC per group of the presets and the calibrated choice; calibrated - AtP and calibrated -
    best preset (the preset with the highest held-out PCC) with their paired intervals.

    ``boot``: :func:`held_out_bootstrap` of the held-out pairs, shared by every run of a study.
    """
    out = {}
    for group, per_candidate in boot.items():
        picked = {m: per_candidate[name] for m, name in PRESETS.items() if name in per_candidate}
        picked[CALIBRATED] = per_candidate[choices[group]]
        values = {m: _finite(v[0]) for m, v in picked.items()}
        ranked = [m for m in PRESETS if values.get(m) is not None]
        best = max(ranked, key=lambda m: (values[m], -list(PRESETS).index(m))) if ranked else None
        diff = picked[CALIBRATED] - picked["AtP"]
        cell = {m: values.get(m) for m in METHODS}
        cell.update(interval={m: bootstrap_interval(picked[m][1:], 0.95) if m in picked else None for m in METHODS},
                    diff=_finite(diff[0]), diff_interval=bootstrap_interval(diff[1:], 0.95), best_preset=best)
        best_diff = None if best is None else picked[CALIBRATED] - picked[best]
        cell.update(best_diff=None if best is None else _finite(best_diff[0]),
                    best_diff_interval=None if best is None else bootstrap_interval(best_diff[1:], 0.95),
                    choice=choices[group])
        out[group] = cell
    return out


def study(name: str, task: str, scores: CandidateScores, n_pool: int, sizes: List[int], draws: int,
          n_bootstrap: int, seconds: float, scale: Optional[Dict] = None,
          defaults: Sequence[str] = DEFAULTS) -> Dict:
    """Choose on subsets of the pool for every size, once per default from the same scores; evaluate
    each choice on the held-out pairs (one run per size, subset and default)."""
    n_total = scores.n_examples
    boot = held_out_bootstrap(scores.rows(torch.arange(n_pool, n_total)), n_bootstrap)
    gen = torch.Generator().manual_seed(0)
    runs = []
    for size in sizes:
        for draw in range(draws if size < n_pool else 1):
            rows = torch.arange(size) if draw == 0 else torch.randperm(n_pool, generator=gen)[:size]
            calibration = scores.rows(rows)
            for default in defaults:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cal = choose_rules(calibration, n_bootstrap=n_bootstrap, default=default)
                runs.append({"size": size, "draw": draw, "default": default, "choices": dict(cal.choices),
                             "decisions": {g: s["decision"] for g, s in cal.selection.items()},
                             "summary": cal.summary(), "held_out": held_out(boot, cal.choices)})
    return {"model": name, "task": task, "n_pool": n_pool, "n_eval": n_total - n_pool, "runs": runs,
            "candidates": [c.name for c in scores.candidates], "seconds": seconds, "scale": scale,
            "defaults": list(defaults)}


def evaluate_ioi(name: str, model, tok, n_pool: int, n_eval: int, **kw) -> Dict:
    began = time.perf_counter()
    words = heldout_words(name, "ioi")
    held = generate_ioi_pairs(n_eval, seed=0, tokenizer=tok, names=words)
    avoid = {p.clean_prompt for p in held}
    pool = [p for p in generate_ioi_pairs(n_pool + n_eval, seed=1, tokenizer=tok, names=words)
            if p.clean_prompt not in avoid][:n_pool]
    batch = encode_ioi(pool + held, tok)
    layers, flags, _ = model_components(model).select(KINDS)
    scores = score_candidates(model, layers, batch.clean_ids, batch.corrupt_ids, metric=batch.metric(),
                              additional_forward_args={"attention_mask": batch.attention_mask},
                              attribute_to_layer_input=flags)
    return study(name, "IOI", scores, len(pool), seconds=time.perf_counter() - began, **kw)


def evaluate_random(family: str, seed: int, n_pool: int, n_eval: int, seq: int = 8, tiny: bool = False,
                    **kw) -> Dict:
    """A random-weight row: the script's 3-layer config, or (``tiny``) the family tests' tiny config."""
    began = time.perf_counter()
    model = tiny_family_model(family, seed) if tiny else random_model(family, seed)
    clean, corrupt = random_pairs(n_pool + n_eval, seq, seed + 100)
    family_entry = FAMILY_TABLE[family]
    post_only = family_entry.post_norms and not any(n.endswith("input_layernorm") for n, _ in model.named_modules())
    scale = strengthen(model, clean, norms=not post_only)  # Olmo2: norms on sublayer outputs only
    components = model_components(model)
    layers, flags, _ = components.select(components.kinds if tiny else KINDS)
    scores = score_candidates(model, layers, clean, corrupt, metric=logit_diff, attribute_to_layer_input=flags)
    name = f"random {family} ({'tiny, ' if tiny else ''}seed {seed})"
    result = study(name, "random tokens", scores, n_pool, seconds=time.perf_counter() - began, scale=scale, **kw)
    result.update(family=family, config=rows_io.TINY_CONFIG if tiny else rows_io.SCRIPT_CONFIG,
                  refused=dict(components.missing))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-pool", type=int, default=100, help="calibration pool (the largest size)")
    parser.add_argument("--n-eval", type=int, default=60, help="held-out pairs")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 20, 50, 100])
    parser.add_argument("--table-size", type=int, default=20, help="calibration size of the main table")
    parser.add_argument("--draws", type=int, default=5, help="subsets per size below the pool size")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), help="random rows, 3-layer script configs")
    parser.add_argument("--tiny-families", nargs="*", default=[],
                        help="random rows, the family tests' tiny configs ('rest': every table family without a script config)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--shipped", nargs="*", default=["tiny-gpt2-ioi", "tiny-llama-ioi"])
    parser.add_argument("--no-smollm", action="store_true", help=f"do not measure SmolLM2-135M (at {SMOLLM})")
    parser.add_argument("--json", default=None, help="also write the measured results as one JSON list")
    parser.add_argument("--rows-dir", default=None,
                        help="write one JSON row file per model there; the page then shows every row file there")
    parser.add_argument("--markdown", default=None, help="also write the page (docs/results_calibration.md)")
    parser.add_argument("--from-json", nargs="*", default=None,
                        help="instead of measuring, take the rows of earlier --json outputs, row files or --rows-dir "
                             "directories (combined by model name, later sources win); with --rows-dir, rows "
                             "without a recorded command get the one these options make (give the options they "
                             "were measured with)")
    args = parser.parse_args()
    if args.from_json is not None:
        results = rows_io.load_rows(args.from_json)
    else:
        results = measure(args)
        print("\n\n".join(tables.main_table(results, args.table_size, d) for d in DEFAULTS) + "\n\n"
              + "\n\n".join(tables.size_table(results, args.sizes, d) for d in DEFAULTS)
              + f"\n\n(total {sum(r['seconds'] for r in results):.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    if args.rows_dir:
        rows_io.write_rows(results, args.rows_dir, measure_command(args), args.table_size)
        results = rows_io.load_rows([args.rows_dir])
    if args.markdown:
        smollm = None if any(r["model"] == "SmolLM2-135M" for r in results) else \
            ("SmolLM2-135M: not measured by this script (AP at every position costs hours there); "
             "its rows, at the task positions, are in the next section.")
        Path(args.markdown).write_text(page(args, results, sum(r["seconds"] for r in results), smollm))


def measure(args) -> List[Dict]:
    """Measure the rows the options name (shipped, SmolLM2, script-config and tiny-config families)."""
    torch.set_grad_enabled(True)
    kw = dict(sizes=args.sizes, draws=args.draws, n_bootstrap=args.n_bootstrap)
    results = []
    for name in args.shipped:
        model, tok = load_embedded(name)
        results.append(evaluate_ioi(name, model, tok, args.n_pool, args.n_eval, **kw))
        print(f"{name}: {results[-1]['seconds']:.0f} s", flush=True)
    if SMOLLM.is_dir() and not args.no_smollm:
        from captum_relp.embedded import load_model

        model, tok = load_model(str(SMOLLM), "cpu", "float32")
        results.append(evaluate_ioi("SmolLM2-135M", model, tok, args.n_pool, args.n_eval, **kw))
    tiny = [f for f in FAMILY_TABLE if f not in FAMILIES] if args.tiny_families == ["rest"] else args.tiny_families
    for family, is_tiny in [(f, False) for f in args.families] + [(f, True) for f in tiny]:
        for seed in args.seeds:
            results.append(evaluate_random(family, seed, args.n_pool, args.n_eval, tiny=is_tiny, **kw))
            print(f"{results[-1]['model']}: {results[-1]['seconds']:.0f} s", flush=True)
    return results


def measure_command(args) -> str:
    """The command that measures the rows of this invocation (recorded in every row file)."""
    parts = ["OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/calibration_eval.py", "--n-pool", args.n_pool,
             "--n-eval", args.n_eval, "--sizes", *args.sizes, "--draws", args.draws, "--n-bootstrap", args.n_bootstrap,
             "--shipped", *args.shipped, "--families", *args.families]
    parts += (["--tiny-families", *args.tiny_families] if args.tiny_families else []) + ["--seeds", *args.seeds]
    return " ".join(map(str, parts + (["--no-smollm"] if args.no_smollm else [])))


def page(args, results, seconds: float, smollm: Optional[str]) -> str:
    """``docs/results_calibration.md``: the runs with the library's default first, then the gradient's."""
    if args.from_json is not None or args.rows_dir:
        sources = args.rows_dir or " ".join(args.from_json)
        written = f"`PYTHONPATH=. python scripts/calibration_eval.py --from-json {sources} --markdown {args.markdown}`"
    else:
        written = "the measuring command with `--markdown " + args.markdown + "`"
    cost = ", ".join(f"{r['model']} {r['seconds']:.0f} s ({len(r['candidates'])} candidates, "
                     f"{r['n_pool']} + {r['n_eval']} pairs)" for r in results)
    return "\n".join([
        "## Calibrated rules (held-out)", "",
        f"Rows measured with (torch {torch.__version__}, CPU, one thread):", "",
        *rows_io.commands(results, measure_command(args)), "",
        f"and this page written from the row files with {written}. Time, {seconds:.0f} s in all: {cost}. "
        "Per model, AP and every default candidate run once on a pool of calibration pairs plus held-out pairs "
        "(pair counts above). Rules are chosen on calibration pairs only, twice from the same scores: with the "
        "library's default, `default=\"best-preset\"` (per component type the fixed preset, the gradient (AtP), "
        "`relp` or `relp-ah`, that agrees best with AP on the calibration pairs is kept unless a candidate beats "
        "it beyond the bootstrap noise), and with `default=\"gradient\"` (the gradient is "
        "kept unless a candidate beats it beyond the noise). Every method is compared with exact activation "
        "patching on the held-out pairs. The best preset of a row is the one of AtP, RelP and RelP+AH with the "
        "highest PCC on the held-out pairs themselves (chosen after seeing them, so the comparison favours "
        "the preset). Random-weight models: random token pairs differing at two positions, metric the logit "
        "difference of tokens 1 and 2 at the last position (encoders: their masked-LM logits there). Brackets: "
        "95% paired-bootstrap intervals over the held-out pairs."
        " The per-pair scores behind these agreements are not shipped: the row files keep the agreements only.", "",
        *tables.sections(results, args.table_size, args.sizes, rows_io.coverage_table(results, args.table_size)),
        *([smollm, ""] if smollm else []), ""])


if __name__ == "__main__":
    main()
