"""Train the tiny embedded IOI/SVA language models shipped in ``captum_relp/embedded``.

Reproduce the shipped models (CPU, a few minutes each)::

    python scripts/train_embedded.py --arch gpt2 --out captum_relp/embedded/tiny-gpt2-ioi --seed 0
    python scripts/train_embedded.py --arch llama --out captum_relp/embedded/tiny-llama-ioi --seed 0

The script builds a seeded synthetic corpus (``scripts/_corpus.py``), a
word-level tokenizer, trains a 4-layer model with AdamW, evaluates IOI and SVA
on held-out names / nouns, and writes ``model.safetensors``, ``config.json``,
tokenizer files, ``training.json`` and ``TRAINING.md`` into ``--out``.

Example:
    >>> args = parse_args(["--arch", "gpt2", "--out", "/tmp/x"])
    >>> args.seed
    0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _corpus import CorpusSpec, build_corpus, build_tokenizer  # noqa: E402

from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs, ioi_metric  # noqa: E402
from captum_relp.tasks.sva import (  # noqa: E402
    STRUCTURES,
    encode_sva,
    generate_sva_pairs,
    sva_metric,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("gpt2", "llama"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-sentences", type=int, default=200_000)
    p.add_argument("--max-sentences-per-seq", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--answer-weight", type=float, default=5.0,
                   help="loss weight of the final IOI name token (others: 1)")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--n-pseudo-names", type=int, default=240,
                   help="training-only pseudo names used in IOI sentences")
    p.add_argument("--p-copy", type=float, default=0.0,
                   help="share of filler sentences with a two-sentence copy pattern over all names")
    return p.parse_args(argv)


def build_model(arch: str, vocab_size: int, tok: Any, args: argparse.Namespace) -> Any:
    """A freshly initialised tiny GPT-2 or Llama causal LM."""
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=args.n_layer, n_embd=args.d_model, n_head=args.n_head,
                         n_positions=64, vocab_size=vocab_size, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **ids)
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=args.n_layer, hidden_size=args.d_model,
                      intermediate_size=3 * args.d_model, num_attention_heads=args.n_head,
                      num_key_value_heads=args.n_head, max_position_embeddings=64,
                      vocab_size=vocab_size, tie_word_embeddings=True, **ids)
    return LlamaForCausalLM(cfg)


def _is_ioi(sentence: str) -> bool:
    return sentence.startswith(("Then,", "When,", "After")) and " gave a " in sentence


def make_sequences(
    sents: list[str], tok: Any, rng: random.Random, max_k: int
) -> list[tuple[list[int], list[int]]]:
    """Group 1..max_k sentences per sequence: ``(ids, ioi_answer_positions)``.

    ``ids`` is ``<bos>`` + sentences + ``<eos>`` (at most 64 tokens); the
    answer positions index the final IOI name tokens (upweighted in the loss).
    """
    out, i = [], 0
    while i < len(sents):
        k = rng.randint(1, max_k)
        ids, answers = [tok.bos_token_id], []
        for j, sent in enumerate(sents[i : i + k]):
            piece = tok.encode(sent if j == 0 else " " + sent, add_special_tokens=False)
            if len(ids) + len(piece) >= 64:
                break
            ids += piece
            if _is_ioi(sent):
                answers.append(len(ids) - 2)  # token before the final "."
        out.append((ids + [tok.eos_token_id], answers))
        i += k
    return out


def collate(
    rows: list[tuple[list[int], list[int]]], pad: int, answer_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows; returns ``ids, mask, weights`` (weights of predicted tokens)."""
    t = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    weights = torch.zeros((len(rows), t))
    for i, (r, answers) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        weights[i, 1 : len(r)] = 1.0
        weights[i, answers] = answer_weight
    return ids, mask, weights


@torch.no_grad()
def evaluate(model: Any, tok: Any, spec: CorpusSpec, n: int, seed: int = 12345) -> dict:
    """IOI (held-out and training names) and SVA (held-out nouns) evaluation."""
    model.eval()
    res: dict[str, Any] = {}
    for tag, names in (("heldout", spec.heldout_names), ("train_names", spec.train_names)):
        batch = encode_ioi(generate_ioi_pairs(n, seed=seed, names=names, tokenizer=tok), tok)
        ld = ioi_metric(model(batch.clean_ids, attention_mask=batch.attention_mask).logits,
                        batch.io_ids, batch.s_ids, batch.last_pos)
        res[f"ioi_{tag}_acc"] = float((ld > 0).float().mean())
        res[f"ioi_{tag}_mean_logit_diff"] = float(ld.mean())
    for s in STRUCTURES:
        pairs = generate_sva_pairs(n, s, seed=seed, nouns=spec.heldout_nouns, tokenizer=tok)
        b = encode_sva(pairs, tok)
        pd = sva_metric(model(b.clean_ids, attention_mask=b.attention_mask).logits,
                        b.correct_ids, b.wrong_ids, b.last_pos)
        pdc = sva_metric(model(b.corrupt_ids, attention_mask=b.attention_mask).logits,
                         b.wrong_ids, b.correct_ids, b.last_pos)
        res[f"sva_{s}_acc"] = float((pd > 0).float().mean())
        res[f"sva_{s}_corrupt_acc"] = float((pdc > 0).float().mean())
        res[f"sva_{s}_mean_prob_diff"] = float(pd.mean())
    model.train()
    return res


def train(args: argparse.Namespace) -> dict:
    """Build corpus + tokenizer, train, evaluate and save; returns the info dict."""
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    spec = CorpusSpec(seed=args.seed, n_pseudo_names=args.n_pseudo_names, p_copy=args.p_copy)
    sents = build_corpus(spec, args.n_sentences)
    tok = build_tokenizer(sents)
    rng = random.Random(args.seed + 1)
    data = make_sequences(sents, tok, rng, args.max_sentences_per_seq)
    model = build_model(args.arch, len(tok), tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab={len(tok)} sequences={len(data)} params={n_params}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    warm = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    ema = None
    for step in range(args.steps):
        idx = torch.randint(len(data), (args.batch_size,), generator=gen).tolist()
        ids, mask, weights = collate([data[i] for i in idx], tok.pad_token_id, args.answer_weight)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        w = weights[:, 1:].reshape(-1)
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 250 == 0 or step == 0:
            msg = f"step {step + 1}/{args.steps} loss {ema:.4f} ({time.time() - t0:.0f}s)"
            if (step + 1) % 500 == 0:
                ev = evaluate(model, tok, spec, 60)
                msg += f" ioi={ev['ioi_heldout_acc']:.2f} " + " ".join(
                    f"{s}={ev[f'sva_{s}_acc']:.2f}" for s in STRUCTURES)
            print(msg, flush=True)
    train_time = time.time() - t0
    model.eval()
    metrics = evaluate(model, tok, spec, args.n_eval)
    print(json.dumps(metrics, indent=1), flush=True)
    print(f"training time {train_time:.1f}s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {
        "arch": args.arch,
        "command": "python scripts/train_embedded.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:]),
        "args": vars(args),
        "seed": args.seed,
        "steps": args.steps,
        "n_params": n_params,
        "vocab_size": len(tok),
        "train_time_s": round(train_time, 1),
        "final_loss_ema": round(float(ema), 4),
        "torch_version": torch.__version__,
        "heldout_names": spec.heldout_names,
        "train_names": spec.train_names,
        "heldout_nouns": [list(p) for p in spec.heldout_nouns],
        "train_nouns": [list(p) for p in spec.train_nouns],
        "eval_seed": 12345,
        "n_eval": args.n_eval,
        "metrics": metrics,
    }
    (out / "training.json").write_text(json.dumps(info, indent=1))
    (out / "TRAINING.md").write_text(_markdown(info))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({size / 1e6:.2f} MB)", flush=True)
    return info


def _markdown(info: dict) -> str:
    m = info["metrics"]
    lines = [
        f"# {Path(info['args']['out']).name}",
        "",
        "Tiny causal LM trained on a synthetic IOI/SVA corpus by `scripts/train_embedded.py`.",
        "",
        f"- command: `{info['command']}`",
        f"- architecture: {info['arch']}, params: {info['n_params']}, vocab: {info['vocab_size']}",
        f"- seed: {info['seed']}, steps: {info['steps']}, "
        f"training time: {info['train_time_s']} s (CPU, torch {info['torch_version']})",
        f"- final training loss (EMA): {info['final_loss_ema']}",
        f"- held-out names (never in IOI templates): {', '.join(info['heldout_names'])}",
        "- held-out nouns (never in SVA sentences): "
        + ", ".join("/".join(p) for p in info["heldout_nouns"]),
        "",
        f"## Evaluation ({info['n_eval']} prompts each, eval seed {info['eval_seed']})",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
