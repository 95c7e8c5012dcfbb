"""Training of ReLU sparse autoencoders (the standard recipe of Marks et al. / Bricken et al.).

Loss per token: ``||x - x_hat||^2 + l1_coeff * sum_i |f_i|`` (squared error summed over
``d_model``), with decoder rows kept at unit norm (gradient component along each row
removed before the Adam step, rows renormalised after it), ``b_dec`` initialised to
the data mean, an L1 warm-up, and optional resampling of dead features.

Activations are scaled internally so that the mean squared norm of ``x - mean`` is
``d_model`` (so ``l1_coeff`` does not depend on the activation scale); the scale is
folded back into the returned weights (hence the returned decoder rows have norm
``1 / scale``, not 1).

Example:
    >>> import torch
    >>> x = torch.relu(torch.randn(512, 8) - 1) @ torch.randn(8, 4)
    >>> sae, stats = train_sae(x, d_dict=16, l1_coeff=0.05, steps=50, seed=0)
    >>> {"dead_fraction", "fve", "fve_train"} <= set(stats)
    True
"""
from __future__ import annotations

import math
import time
from typing import Dict, Tuple

import torch
from torch import Tensor

from captum_relp.circuits.sae import SparseAutoencoder


def fraction_variance_explained(x: Tensor, x_hat: Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all rows of ``(N, d)``."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - residual / total.clamp_min(1e-30))


@torch.no_grad()
def sae_stats(sae: SparseAutoencoder, x: Tensor, batch_size: int = 4096) -> Dict[str, float]:
    """FVE, mean L0, fraction of never-active features and MSE of ``sae`` on ``x (N, d)``."""
    x_hats, l0, active = [], 0.0, torch.zeros(sae.d_dict, dtype=torch.bool)
    for chunk in x.split(batch_size):
        x_hat, f = sae(chunk)
        x_hats.append(x_hat.to(x.dtype))
        nonzero = f > 0
        l0 += float(nonzero.sum())
        active |= nonzero.any(0).cpu()
    x_hat = torch.cat(x_hats)
    return {"fve": fraction_variance_explained(x, x_hat), "l0": l0 / max(len(x), 1),
            "dead_fraction": float((~active).float().mean()),
            "mse": float((x - x_hat).double().pow(2).sum(-1).mean())}


def _project_out_parallel_grad(W_dec: Tensor) -> None:
    # keep the gradient tangent to the unit sphere of each decoder row
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec.data).sum(-1, keepdim=True) * W_dec.data


def train_sae(
    activations: Tensor,
    d_dict: int,
    l1_coeff: float = 0.1,
    steps: int = 3000,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    l1_warmup_fraction: float = 0.05,
    resample_at: Tuple[float, ...] = (0.2, 0.4, 0.6),
    normalize: bool = True,
    log_every: int = 0,
) -> Tuple[SparseAutoencoder, Dict[str, float]]:
    """Train a ReLU SAE on ``activations (N, d_model)``; deterministic given ``seed``.

    Args:
        activations: Training data (a random ``heldout_fraction`` of rows is held out).
        d_dict: Number of features.
        l1_coeff: Sparsity coefficient (on the internally normalised scale).
        steps, lr, batch_size: Adam optimisation (lr decays linearly over the last 20%).
        seed: Seeds the split, the initialisation, the batches and the resampling.
        heldout_fraction: Rows used only for the returned statistics.
        l1_warmup_fraction: L1 coefficient ramps linearly from 0 over this part of training.
        resample_at: Fractions of ``steps`` at which features inactive since the
            previous check are re-initialised towards badly reconstructed inputs.
        normalize: Scale activations to mean squared (centred) norm ``d_model``.
        log_every: Print progress every this many steps (0: silent).

    Returns:
        ``(sae, stats)``: a float32 SAE on the original activation scale, and stats
        with held-out ``fve``, ``l0`` (mean active features per token), ``mse``, the
        ``dead_fraction`` of features never active on any of the N activations,
        ``fve_train``, sizes and the number of resampled features.
    """
    if activations.dim() != 2:
        raise ValueError(f"activations must be (N, d_model), got {tuple(activations.shape)}")
    if not torch.isfinite(activations).all():
        raise ValueError("activations contain non-finite values")
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    data = activations.detach().to("cpu", torch.float32)
    n, d_model = data.shape
    perm = torch.randperm(n, generator=gen)
    n_held = max(1, int(round(n * heldout_fraction))) if heldout_fraction > 0 else 0
    held, train = data[perm[:n_held]], data[perm[n_held:]]
    if len(train) < 2:
        raise ValueError(f"need at least 2 training rows, got {len(train)}")

    mean = train.mean(0)
    scale = math.sqrt(d_model / float((train - mean).pow(2).sum(-1).mean().clamp_min(1e-12))) \
        if normalize else 1.0
    xs = train * scale

    sae = SparseAutoencoder(d_model, d_dict)
    with torch.no_grad():
        w = torch.randn(d_dict, d_model, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_dec.copy_(mean * scale)
    params = list(sae.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, int(steps * l1_warmup_fraction))
    decay_start = int(0.8 * steps)
    resample_steps = {int(steps * r) for r in resample_at if 0 < r < 1}
    fired = torch.zeros(d_dict, dtype=torch.bool)
    n_resampled = 0

    for step in range(steps):
        frac = 1.0 if step < decay_start else (steps - step) / max(1, steps - decay_start)
        for group in opt.param_groups:
            group["lr"] = lr * frac
        x = xs[torch.randint(len(xs), (batch_size,), generator=gen)]
        x_hat, f = sae(x)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = f.sum(-1).mean()  # f >= 0
        loss = mse + l1_coeff * min(1.0, (step + 1) / warm) * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _project_out_parallel_grad(sae.W_dec)
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        fired |= (f.detach() > 0).any(0)
        if step in resample_steps:
            n_resampled += _resample(sae, opt, xs, ~fired, gen)
            fired.zero_()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps} mse {mse.item():.3f} l1 {l1.item():.2f} "
                  f"l0 {(f > 0).float().sum(-1).mean().item():.1f}", flush=True)

    with torch.no_grad():  # fold the input scale back into the weights
        sae.W_enc *= scale
        sae.W_dec /= scale
        sae.b_dec /= scale
    sae.eval().requires_grad_(False)
    held_stats = sae_stats(sae, held) if n_held else {}
    all_stats = sae_stats(sae, data)
    stats = {
        **{key: held_stats.get(key, all_stats[key]) for key in ("fve", "l0", "mse")},
        "dead_fraction": all_stats["dead_fraction"],
        "fve_train": sae_stats(sae, train)["fve"],
        "n_train": len(train), "n_heldout": n_held, "d_model": d_model, "d_dict": d_dict,
        "n_resampled": n_resampled, "input_scale": scale, "train_time_s": time.time() - t0,
    }
    return sae, stats


@torch.no_grad()
def _resample(sae: SparseAutoencoder, opt: torch.optim.Optimizer, xs: Tensor, dead: Tensor,
              gen: torch.Generator, n_probe: int = 4096) -> int:
    """Re-initialise ``dead`` features towards inputs with large reconstruction error."""
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return 0
    probe = xs[torch.randint(len(xs), (min(n_probe, len(xs)),), generator=gen)]
    err = (probe - sae(probe)[0]).pow(2).sum(-1)
    pick = torch.multinomial(err.clamp_min(1e-12), len(idx), replacement=True, generator=gen)
    directions = probe[pick] - sae.b_dec
    directions /= directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = directions
    sae.W_enc[:, idx] = directions.t() * enc_norm * 0.2
    sae.b_enc[idx] = 0.0
    for param, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0.0
    return len(idx)


__all__ = ["train_sae", "fraction_variance_explained", "sae_stats"]
