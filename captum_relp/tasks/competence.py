r"""Does the model solve the task? The competence check run before any attribution.

Scores explain a behaviour only when the model shows it. For :math:`N` pairs with metric values
:math:`m_i` on the clean and :math:`m'_i` on the corrupted prompt, the check reports:

* the mean metric on clean and on corrupted prompts;
* the *clean accuracy*: the fraction of pairs where the answer beats the foil on the clean
  prompt (the answer set is more probable than the foil set; greater-than: the years above the
  label are more probable than those at or below it; ``logprob``: the answer sequence is more
  probable than the foil sequence), with the one-sided binomial p-value against chance (1/2);
* the clean--corrupted difference :math:`d_i = m_i - m'_i`: its mean, a 95% bootstrap interval
  of the mean over pairs, and the effect size :math:`\bar d / s_d` (Cohen's :math:`d_z`).

It warns when the model does not solve the task: clean accuracy not above chance at the 5%
level, or a difference whose interval holds zero or lies below it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from captum_relp.tasks.file_encode import TaskBatch
from captum_relp.tasks.file_metrics import AnswerLogProb

ALPHA = 0.05
"""Level of both tests of the check."""


def binomial_p_value(successes: int, trials: int, chance: float = 0.5) -> float:
    """One-sided p-value of at least ``successes`` in ``trials`` at success rate ``chance``.

    Example:
        >>> round(binomial_p_value(15, 16), 5)
        0.00026
    """
    return float(sum(math.comb(trials, k) * chance ** k * (1 - chance) ** (trials - k)
                     for k in range(successes, trials + 1)))


def bootstrap_mean_interval(values: Tensor, n_bootstrap: int = 1000, seed: int = 0,
                            level: float = 0.95) -> List[float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement).

    Example:
        >>> lo, hi = bootstrap_mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> 1.0 <= lo < 2.5 < hi <= 4.0
        True
    """
    values = values.double().flatten()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(values.numel(), (n_bootstrap, values.numel()), generator=gen)
    means = values[idx].mean(1)
    alpha = (1.0 - level) / 2
    q = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


@dataclass
class Competence:
    """The result of :func:`competence_check` (plain data: saved under ``"task"`` in the results).

    Example:
        >>> c = Competence.from_values(torch.tensor([2.0, 3.0, 1.0, 2.5]), torch.tensor([-1.0, 0.0, -2.0, -1.0]),
        ...                            torch.tensor([True, True, True, True]))
        >>> c.clean_accuracy, c.solves, c.warnings
        (1.0, False, ['clean accuracy 1.00 (4 of 4 pairs) is not above chance (1/2) beyond noise (p = 0.062)'])
    """

    n_pairs: int
    clean_mean: float
    corrupted_mean: float
    clean_accuracy: float
    accuracy_p_value: float
    difference_mean: float
    difference_interval: List[float]
    effect_size: Optional[float]
    solves: bool
    warnings: List[str] = field(default_factory=list)
    clean_values: List[float] = field(default_factory=list)
    corrupted_values: List[float] = field(default_factory=list)

    @classmethod
    def from_values(cls, clean: Tensor, corrupted: Tensor, beats: Tensor, n_bootstrap: int = 1000,
                    seed: int = 0) -> "Competence":
        """The check from per-pair metric values and whether the answer beats the foil (clean)."""
        clean, corrupted = clean.double().flatten(), corrupted.double().flatten()
        n, wins = clean.numel(), int(beats.sum())
        diff = clean - corrupted
        interval = bootstrap_mean_interval(diff, n_bootstrap, seed)
        spread = float(diff.std()) if n > 1 else 0.0
        effect = float(diff.mean()) / spread if spread > 0 else None
        p_value = binomial_p_value(wins, n)
        warnings = []
        if p_value >= ALPHA:
            warnings.append(f"clean accuracy {wins / n:.2f} ({wins} of {n} pairs) is not above chance (1/2) "
                            f"beyond noise (p = {p_value:.2g})")
        if interval[0] <= 0.0:
            where = "lies below zero" if interval[1] < 0 else "holds zero"
            warnings.append(f"the clean-corrupted difference of the metric, {float(diff.mean()):.4g} "
                            f"[{interval[0]:.4g}, {interval[1]:.4g}], {where}: the corruption does not "
                            "change the behaviour beyond noise")
        return cls(n, float(clean.mean()), float(corrupted.mean()), wins / n, p_value, float(diff.mean()),
                   interval, effect, not warnings, warnings, clean.tolist(), corrupted.tolist())

    def to_json(self) -> dict:
        """A JSON-ready copy."""
        return asdict(self)

    def summary(self) -> str:
        """Lines for the CLI: the numbers, then one ``WARNING`` line per failed test."""
        effect = "n/a" if self.effect_size is None else f"{self.effect_size:.2f}"
        lines = [f"task check on {self.n_pairs} pairs: metric clean {self.clean_mean:.4g}, corrupted "
                 f"{self.corrupted_mean:.4g}; clean accuracy {self.clean_accuracy:.2f} (p = {self.accuracy_p_value:.2g} "
                 f"against chance); clean-corrupted difference {self.difference_mean:.4g} "
                 f"[{self.difference_interval[0]:.4g}, {self.difference_interval[1]:.4g}], effect size {effect}"]
        lines += [f"WARNING: the model may not solve this task: {w}" for w in self.warnings]
        return "\n".join(lines)


def _logits(model: nn.Module, ids: Tensor, mask: Tensor, batch_size: int) -> List[Tensor]:
    with torch.no_grad():
        return [model(ids[i : i + batch_size], attention_mask=mask[i : i + batch_size]).logits
                for i in range(0, ids.shape[0], batch_size)]


def _values(batch: TaskBatch, logits: List[Tensor], batch_size: int) -> Tensor:
    return torch.cat([batch.select(slice(start, start + part.shape[0])).metric()(part).cpu()
                      for start, part in zip(range(0, batch.clean_ids.shape[0], batch_size), logits)])


def _beats(batch: TaskBatch, values: Tensor, logits: List[Tensor], batch_size: int) -> Tensor:
    """Per pair: the answer set is more probable than the foil set on the clean prompt."""
    if batch.digit_ids:  # greater-than: the years above the label more probable than the others
        return values > 0
    out = []
    for start, part in zip(range(0, batch.clean_ids.shape[0], batch_size), logits):
        sliced = batch.select(slice(start, start + part.shape[0]))
        final = torch.log_softmax(part[torch.arange(part.shape[0]), sliced.last_pos].float(), -1)
        keep_c, keep_i = sliced.correct >= 0, sliced.incorrect >= 0
        correct = final.gather(1, sliced.correct.clamp_min(0)).masked_fill(~keep_c, -torch.inf).logsumexp(1)
        wrong = final.gather(1, sliced.incorrect.clamp_min(0)).masked_fill(~keep_i, -torch.inf).logsumexp(1)
        out.append((correct > wrong).cpu())
    return torch.cat(out)


def competence_check(model: nn.Module, batch: TaskBatch, foil_batch: Optional[TaskBatch] = None,
                     batch_size: int = 32, n_bootstrap: int = 1000, seed: int = 0) -> Competence:
    """Run the model on the clean and corrupted prompts of ``batch`` and check it solves the task.

    Args:
        model: a Hugging Face causal LM.
        batch: the task's pairs (:func:`~captum_relp.tasks.file_encode.encode_task`).
        foil_batch: for the ``logprob`` metric, the same pairs encoded with ``swap=True``
            (the foil's log-probability, for the accuracy); without it the accuracy compares
            the answer's first token with the foil's.
        batch_size: prompts per forward pass.
        n_bootstrap, seed: of the bootstrap interval of the difference.

    Returns:
        Competence

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> from captum_relp.tasks import encode_ioi, generate_ioi_pairs
        >>> from captum_relp.tasks.file_encode import encode_task
        >>> from captum_relp.tasks.file_task import TaskPair
        >>> model, tok = load_embedded()
        >>> pairs = [TaskPair(p.clean_prompt, p.corrupt_prompt, answer=p.io_name, foil=p.s_name)
        ...          for p in generate_ioi_pairs(12, seed=5, tokenizer=tok)]
        >>> check = competence_check(model, encode_task(pairs, tok))
        >>> check.solves, check.clean_accuracy
        (True, 1.0)
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    metric = batch.metric()
    clean_logits = _logits(model, batch.clean_ids, batch.attention_mask, batch_size)
    clean = _values(batch, clean_logits, batch_size)
    corrupted = _values(batch, _logits(model, batch.corrupt_ids, batch.attention_mask, batch_size), batch_size)
    if isinstance(metric, AnswerLogProb) and foil_batch is not None:
        foil_batch = foil_batch.to(device)
        foil = _values(foil_batch, _logits(model, foil_batch.clean_ids, foil_batch.attention_mask,
                                           batch_size), batch_size)
        beats = clean > foil
    else:
        beats = _beats(batch, clean, clean_logits, batch_size)
    return Competence.from_values(clean, corrupted, beats, n_bootstrap, seed)


__all__ = ["ALPHA", "Competence", "competence_check", "binomial_p_value", "bootstrap_mean_interval"]
