"""Train the sparse autoencoders (dictionaries) shipped with the embedded models.

One residual-stream, one attention-output and one MLP-output dictionary per layer
(Marks et al., 2025, "Sparse feature circuits"), ``d_dict = 4 * d_model``::

    python scripts/train_saes.py --model tiny-gpt2-ioi --seed 0
    python scripts/train_saes.py --model tiny-llama-ioi --seed 0

Activations are collected on ~20k tokens of the model's synthetic training corpus
(``scripts/_corpus.py``, same ``CorpusSpec`` seed as the model, sentences drawn from
a separate stream ``--corpus-offset`` sentences in), skipping ``<bos>`` and padding:

* ``resid_<l>``: output of block ``l`` (residual stream after the block);
* ``attn_<l>``: output of the attention output projection (``c_proj`` / ``o_proj``);
* ``mlp_<l>``: output of the MLP module.

Each dictionary is saved in dictionary_learning key layout as
``<model>/saes/<kind>_<layer>.safetensors`` (``encoder.weight``, ``encoder.bias``,
``decoder.weight``, ``bias``; float32), with ``saes.json`` holding the command, seed,
hyper-parameters and per-dictionary held-out FVE, mean L0 and dead fraction. Load
them with :func:`captum_relp.embedded.load_embedded_saes`.

``--model-path`` trains on any saved causal LM folder with a tokenizer instead (the
output then goes to ``--out``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_relp.circuits.sae import save_dictionary_learning  # noqa: E402
from captum_relp.circuits.sae_train import train_sae  # noqa: E402
from captum_relp.models import find_blocks, model_components  # noqa: E402


def _load_corpus_module():
    spec = importlib.util.spec_from_file_location("_corpus", ROOT / "scripts" / "_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_corpus", module)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-gpt2-ioi", help="embedded model name")
    p.add_argument("--model-path", default=None, help="train on this model folder instead")
    p.add_argument("--out", default=None, help="output folder (default <model>/saes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-seed", type=int, default=None,
                   help="CorpusSpec seed (default: the model's training seed, else 0)")
    p.add_argument("--corpus-offset", type=int, default=200_000,
                   help="skip this many sentences of the corpus stream")
    p.add_argument("--n-tokens", type=int, default=20_000)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--l1-coeff", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def corpus_sentences(corpus, seed: int, offset: int, n_tokens: int, tok) -> List[str]:
    """Sentences of the synthetic corpus (after ``offset``) totalling ~``n_tokens`` tokens."""
    spec = corpus.CorpusSpec(seed=seed)
    sents = corpus.build_corpus(spec, offset + 4 * n_tokens // 5 + 100)[offset:]
    out, total = [], 0
    for sent in sents:
        if total >= n_tokens:
            break
        out.append(sent)
        total += len(tok.encode(sent, add_special_tokens=False))
    if total < n_tokens:
        raise RuntimeError(f"corpus too short: {total} < {n_tokens} tokens")
    return out


@torch.no_grad()
def collect_activations(model, tok, sentences: List[str], batch_size: int = 64
                        ) -> Dict[str, torch.Tensor]:
    """``{"resid_l", "attn_l", "mlp_l": (n_tokens, d_model)}`` over non-pad, non-bos tokens."""
    parts = model_components(model)
    blocks = list(find_blocks(model))
    sites = {}
    for i, block in enumerate(blocks):
        sites[f"resid_{i}"], sites[f"attn_{i}"], sites[f"mlp_{i}"] = block, parts.attn[i], parts.mlp[i]
    store: Dict[str, List[torch.Tensor]] = {k: [] for k in sites}
    keep: Dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            store[name].append(out[keep["mask"]].detach().float().cpu())
        return fn

    handles = [m.register_forward_hook(hook(k)) for k, m in sites.items()]
    try:
        special = {t for t in (tok.pad_token_id, tok.bos_token_id) if t is not None}
        for start in range(0, len(sentences), batch_size):
            enc = tok(sentences[start:start + batch_size], return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"].bool()
            for t in special:
                mask &= ids != t
            keep["mask"] = mask
            model(input_ids=ids, attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def main(argv: List[str] | None = None) -> dict:
    """Entry point; returns the ``saes.json`` record."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_path:
        path = Path(args.model_path)
        if not args.out:
            raise SystemExit("--out is required with --model-path")
    else:
        from captum_relp.embedded import embedded_model_path

        path = embedded_model_path(args.model)
    out = Path(args.out) if args.out else path / "saes"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    corpus_seed = args.corpus_seed
    if corpus_seed is None:
        info_file = path / "training.json"
        corpus_seed = json.loads(info_file.read_text())["seed"] if info_file.is_file() else 0
    sents = corpus_sentences(_load_corpus_module(), corpus_seed, args.corpus_offset,
                             args.n_tokens, tok)
    t0 = time.time()
    acts = collect_activations(model, tok, sents)
    n_tokens = len(next(iter(acts.values())))
    print(f"{path.name}: {len(sents)} sentences, {n_tokens} tokens, {len(acts)} sites "
          f"({time.time() - t0:.1f}s)", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": path.name,
        "command": "python scripts/train_saes.py " + " ".join(shlex.quote(a) for a in
                                                                (argv if argv is not None
                                                                 else sys.argv[1:])),
        "seed": args.seed, "corpus_seed": corpus_seed, "corpus_offset": args.corpus_offset,
        "n_sentences": len(sents), "n_tokens": n_tokens, "args": vars(args),
        "format": "dictionary_learning keys (encoder.weight, encoder.bias, decoder.weight, "
                  "bias) in <name>.safetensors, float32",
        "sites": {"resid": "block output", "attn": "attention output projection output",
                  "mlp": "MLP module output"},
        "torch_version": torch.__version__, "dictionaries": {},
    }
    for i, (name, x) in enumerate(acts.items()):
        d_model = x.shape[1]
        sae, stats = train_sae(x, args.expansion * d_model, l1_coeff=args.l1_coeff,
                               steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                               seed=args.seed + i)
        save_dictionary_learning(sae, out / f"{name}.safetensors", dtype=torch.float32)
        record["dictionaries"][name] = {k: (round(v, 5) if isinstance(v, float) else v)
                                        for k, v in stats.items()}
        print(f"  {name}: FVE {stats['fve']:.3f}  L0 {stats['l0']:.1f}  "
              f"dead {stats['dead_fraction']:.3f}  ({stats['train_time_s']:.0f}s)", flush=True)
    (out / "saes.json").write_text(json.dumps(record, indent=1))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved {len(acts)} dictionaries to {out} ({size / 1e6:.2f} MB)", flush=True)
    return record


if __name__ == "__main__":
    main()
