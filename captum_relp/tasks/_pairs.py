"""Shared plumbing of the contrastive tasks: aligned tokenisation and pair batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


def is_single_token(word: str, tokenizer: Any) -> bool:
    """Whether `` word`` (with a leading space) is exactly one known (non-unk) token.

    Example:
        >>> is_single_token("Mary", None)
        True
    """
    if tokenizer is None:
        return True
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    return len(ids) == 1 and (unk is None or ids[0] != unk)


def single_token_words(words: Sequence[str], tokenizer: Any) -> list[str]:
    """Words that encode (with a leading space) to exactly one known token.

    Example:
        >>> single_token_words(["Mary"], None)
        ['Mary']
    """
    return [w for w in words if is_single_token(w, tokenizer)]


@dataclass
class PairBatch:
    """Shared fields and behaviour of tokenized contrastive batches (:class:`IOIBatch`, ``SVABatch``)."""

    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_pos: torch.Tensor

    def __len__(self) -> int:
        return int(self.clean_ids.shape[0])

    def to(self, device: Any):
        """Move all tensors to ``device`` (returns a new batch)."""
        kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return type(self)(**kw)

    def select(self, rows: slice):
        """The batch of rows ``rows`` (tensors sliced; position labels kept)."""
        kw = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return type(self)(**kw)


def pad_id(tokenizer: Any) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def tokenize_aligned(
    clean: Sequence[str], corrupt: Sequence[str], tokenizer: Any, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Tokenize aligned prompt lists with right padding.

    Returns ``clean_ids, corrupt_ids, attention_mask, last_pos, positions``; raises if a
    clean and a corrupt prompt tokenize to different lengths.
    """
    rows_c = [tokenizer(p)["input_ids"] for p in clean]
    rows_k = [tokenizer(p)["input_ids"] for p in corrupt]
    for i, (c, k) in enumerate(zip(rows_c, rows_k)):
        if len(c) != len(k):
            raise ValueError(
                f"pair {i}: clean and corrupted prompts tokenize to different lengths "
                f"({len(c)} vs {len(k)}); use the tokenizer= filter when generating pairs"
            )
    if not rows_c:
        raise ValueError("no prompts to encode")
    t_max = max(len(r) for r in rows_c)
    pad = pad_id(tokenizer)
    n = len(rows_c)
    clean_ids = torch.full((n, t_max), pad, dtype=torch.long)
    corrupt_ids = torch.full((n, t_max), pad, dtype=torch.long)
    mask = torch.zeros((n, t_max), dtype=torch.long)
    for i, (c, k) in enumerate(zip(rows_c, rows_k)):
        clean_ids[i, : len(c)] = torch.tensor(c)
        corrupt_ids[i, : len(k)] = torch.tensor(k)
        mask[i, : len(c)] = 1
    last_pos = mask.sum(1) - 1
    positions = [tokenizer.decode([i]) for i in rows_c[0]]
    if device is not None:
        clean_ids, corrupt_ids = clean_ids.to(device), corrupt_ids.to(device)
        mask, last_pos = mask.to(device), last_pos.to(device)
    return clean_ids, corrupt_ids, mask, last_pos, positions


def word_ids(words: Sequence[str], tokenizer: Any, device: Any = None) -> torch.Tensor:
    out = []
    for w in words:
        ids = tokenizer.encode(" " + w, add_special_tokens=False)
        if not is_single_token(w, tokenizer):
            raise ValueError(f"{w!r} is not a single token (with a leading space): {ids}")
        out.append(ids[0])
    return torch.tensor(out, dtype=torch.long, device=device)
