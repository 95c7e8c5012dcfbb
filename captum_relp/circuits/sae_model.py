"""The sparse autoencoder (dictionary) module used by the circuit code, in four architectures.

:class:`SparseAutoencoder` maps an activation ``x`` (any leading dims, last dim
``d_model``) to features ``f`` and back to ``x_hat``. It reproduces SAELens'
inference SAEs (``standard``, ``topk``, ``jumprelu``, ``gated``, each with its
``normalize_activations`` mode) and dictionary_learning's ``AutoEncoder``,
``JumpReluAutoEncoder``, ``AutoEncoderTopK`` and ``GatedAutoEncoder``; the loaders
live in :mod:`captum_relp.circuits.sae` and :mod:`captum_relp.circuits.saelens`.

Example:
    >>> import torch
    >>> sae = SparseAutoencoder(4, 8, architecture="topk", k=2)
    >>> x_hat, f = sae(torch.randn(2, 3, 4))
    >>> x_hat.shape, f.shape
    (torch.Size([2, 3, 4]), torch.Size([2, 3, 8]))
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale")
EXTRA_PARAMETERS: Dict[str, Tuple[str, ...]] = {
    "standard": (), "topk": (), "jumprelu": ("threshold",), "gated": ("b_gate", "b_mag", "r_mag"),
}
LAYER_NORM_EPS = 1e-5


class SparseAutoencoder(nn.Module):
    r"""Sparse autoencoder ``x -> f -> x_hat``.

    With ``x' = norm(x) - b_dec`` (``b_dec`` only if ``apply_b_dec_to_input``) and
    ``h = x' @ W_enc + b_enc`` the features are

    * ``standard``: ``relu(h)``;
    * ``topk``: the ``k`` largest entries of ``h`` (after ``relu``), others zero; with
      ``rescale_acts_by_decoder_norm`` ``h`` is scaled by the decoder row norms first
      and the features divided by them in ``decode`` (SAELens);
    * ``jumprelu``: ``relu(h) * (h > threshold)``;
    * ``gated``: ``(x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc * exp(r_mag)) + b_mag)``;

    and ``x_hat = denorm(f @ W_dec + b_dec)``. ``normalize_activations`` follows SAELens:
    ``layer_norm`` standardises ``x`` (mean, unbiased std + 1e-5) and ``constant_norm_rescale``
    scales it to norm ``sqrt(d_model)``; ``decode`` undoes this with the statistics of
    the last ``encode`` call (as SAELens does). ``expected_average_only_in`` and ``none``
    leave ``x`` as it is (SAELens folds a known scaling factor into the weights).

    Args:
        d_model: Width of the activations.
        d_dict: Number of features.
        apply_b_dec_to_input: If True (default), ``encode`` subtracts ``b_dec`` first.
        dtype, device: Of the parameters (zero-initialised).
        architecture: One of ``standard``, ``topk``, ``jumprelu``, ``gated``.
        k: Active features of a ``topk`` SAE.
        normalize_activations: One of ``none``, ``expected_average_only_in``,
            ``layer_norm``, ``constant_norm_rescale``.
        rescale_acts_by_decoder_norm: SAELens' TopK option (see above).

    ``encode`` casts its input to the parameter dtype; ``decode`` returns the
    parameter dtype (callers cast back).

    Example:
        >>> import torch
        >>> sae = SparseAutoencoder(2, 3)
        >>> with torch.no_grad():
        ...     _ = sae.W_enc.copy_(torch.tensor([[1., 0., -1.], [0., 1., 1.]]))
        >>> sae.encode(torch.tensor([[2., -1.]])).detach()
        tensor([[2., 0., 0.]])
    """

    def __init__(self, d_model: int, d_dict: int, apply_b_dec_to_input: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None, *,
                 architecture: str = "standard", k: Optional[int] = None,
                 normalize_activations: str = "none",
                 rescale_acts_by_decoder_norm: bool = False) -> None:
        super().__init__()
        if d_model < 1 or d_dict < 1:
            raise ValueError(f"d_model and d_dict must be positive, got {d_model}, {d_dict}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got "
                             f"{normalize_activations!r}")
        if architecture == "topk" and not (isinstance(k, int) and 0 < k <= d_dict):
            raise ValueError(f"a topk SAE needs an integer k in [1, {d_dict}], got {k!r}")
        kw = dict(dtype=dtype or torch.float32, device=device)
        self.d_model, self.d_dict = int(d_model), int(d_dict)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.architecture, self.k = architecture, k
        self.normalize_activations = normalize_activations
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.W_enc = nn.Parameter(torch.zeros(d_model, d_dict, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_dict, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_dict, d_model, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **kw))
        for name in EXTRA_PARAMETERS[architecture]:
            setattr(self, name, nn.Parameter(torch.zeros(d_dict, **kw)))
        self.norm_stats: Optional[Tuple[Tensor, Tensor]] = None

    def normalize(self, x: Tensor) -> Tensor:
        """``x`` normalised as ``normalize_activations`` says; the statistics are kept for ``decode``."""
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            self.norm_stats = (mu, std)
            return (x - mu) / (std + LAYER_NORM_EPS)
        if self.normalize_activations == "constant_norm_rescale":
            coeff = (self.d_model ** 0.5) / x.norm(dim=-1, keepdim=True)
            self.norm_stats = (torch.zeros_like(coeff), coeff)
            return x * coeff
        return x

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` with the statistics of the last ``encode``."""
        if self.normalize_activations not in ("layer_norm", "constant_norm_rescale"):
            return x
        if self.norm_stats is None:
            raise RuntimeError(f"decode of a {self.normalize_activations!r} SAE needs a prior "
                               "encode (its statistics undo the normalisation)")
        shift, scale = self.norm_stats
        if self.normalize_activations == "layer_norm":
            return x * scale + shift
        return x / scale

    def encode(self, x: Tensor) -> Tensor:
        """Features of ``x``, shape ``(..., d_dict)``."""
        x = self.normalize(x.to(self.W_enc.dtype))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.architecture == "gated":
            gate = (x @ self.W_enc + self.b_gate) > 0
            magnitude = torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return gate.to(magnitude.dtype) * magnitude
        hidden = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(hidden) * (hidden > self.threshold).to(hidden.dtype)
        if self.architecture == "topk":
            if self.rescale_acts_by_decoder_norm:
                hidden = hidden * self.W_dec.norm(dim=-1)
            values, indices = torch.topk(hidden, k=int(self.k), dim=-1, sorted=False)
            return torch.zeros_like(hidden).scatter(-1, indices, torch.relu(values))
        return torch.relu(hidden)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``denorm(f @ W_dec + b_dec)``, shape ``(..., d_model)``."""
        f = f.to(self.W_dec.dtype)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return self.denormalize(f @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(x_hat, f)``."""
        f = self.encode(x)
        return self.decode(f), f

    def extra_repr(self) -> str:
        text = (f"d_model={self.d_model}, d_dict={self.d_dict}, "
                f"apply_b_dec_to_input={self.apply_b_dec_to_input}")
        if self.architecture != "standard":
            text += f", architecture={self.architecture!r}"
        if self.k is not None:
            text += f", k={self.k}"
        if self.normalize_activations != "none":
            text += f", normalize_activations={self.normalize_activations!r}"
        return text

    @classmethod
    def from_tensors(cls, W_enc: Tensor, b_enc: Optional[Tensor], W_dec: Tensor, b_dec: Tensor,
                     apply_b_dec_to_input: bool = True, source: str = "tensors",
                     extra: Optional[Mapping[str, Tensor]] = None, **options) -> "SparseAutoencoder":
        """Build from weights after checking ranks, shapes and finiteness.

        Args:
            extra: The architecture's additional tensors (``threshold``; ``b_gate``,
                ``b_mag``, ``r_mag``), each of shape ``(d_dict,)``.
            options: ``architecture``, ``k``, ``normalize_activations``,
                ``rescale_acts_by_decoder_norm``.

        Raises:
            ValueError: Naming ``source`` and the problem.
        """
        if b_enc is None:  # gated SAEs have no b_enc
            b_enc = torch.zeros(W_enc.shape[-1], dtype=W_enc.dtype, device=W_enc.device)
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        check_sae_tensors(tensors, source)
        architecture = options.get("architecture", "standard")
        names = EXTRA_PARAMETERS.get(architecture, ())
        extra = dict(extra or {})
        missing = [n for n in names if n not in extra]
        if missing:
            raise ValueError(f"{source}: a {architecture} SAE needs tensor(s) {missing}")
        d_model, d_dict = W_enc.shape
        for name in names:
            value = extra[name]
            if not isinstance(value, Tensor) or tuple(value.shape) != (d_dict,):
                raise ValueError(f"{source}: {name} must have shape ({d_dict},), got "
                                 f"{tuple(getattr(value, 'shape', ()))}")
            tensors[name] = value
        check_finite(tensors, source)
        sae = cls(d_model, d_dict, apply_b_dec_to_input, dtype=W_enc.dtype, device=W_enc.device,
                  **options)
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(sae, name).copy_(value)
        return sae


def read_state_dict(file: Path) -> Dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or a torch state dict; a ``ValueError`` naming the file."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{file}: not a readable torch state dict ({err})") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def check_sae_tensors(t: Mapping[str, Tensor], source: str) -> None:
    """Raise ValueError naming ``source`` unless ``W_enc, b_enc, W_dec, b_dec`` fit together.

    Example:
        >>> import torch
        >>> t = {"W_enc": torch.zeros(2, 3), "b_enc": torch.zeros(3), "W_dec": torch.zeros(3, 2),
        ...      "b_dec": torch.zeros(5)}
        >>> check_sae_tensors(t, "my.safetensors")
        Traceback (most recent call last):
        ...
        ValueError: my.safetensors: shape mismatch: b_dec has shape (5,), expected (2,) from W_enc (d_model=2, d_dict=3)
    """
    for name, rank in (("W_enc", 2), ("b_enc", 1), ("W_dec", 2), ("b_dec", 1)):
        if not isinstance(t[name], Tensor):
            raise ValueError(f"{source}: {name} is not a tensor ({type(t[name]).__name__})")
        if t[name].dim() != rank:
            raise ValueError(f"{source}: {name} must have rank {rank}, got shape "
                             f"{tuple(t[name].shape)}")
    d_model, d_dict = t["W_enc"].shape
    expected = {"b_enc": (d_dict,), "W_dec": (d_dict, d_model), "b_dec": (d_model,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(
                f"{source}: shape mismatch: {name} has shape {tuple(t[name].shape)}, expected "
                f"{shape} from W_enc (d_model={d_model}, d_dict={d_dict})")
    check_finite(t, source)


def check_finite(t: Mapping[str, Tensor], source: str) -> None:
    """Raise ValueError naming ``source`` for non-float or non-finite tensors.

    Example:
        >>> import torch
        >>> check_finite({"b_dec": torch.tensor([float("nan")])}, "cfg")
        Traceback (most recent call last):
        ...
        ValueError: cfg: b_dec contains non-finite values (NaN or inf)
    """
    for name, value in t.items():
        if not value.is_floating_point():
            raise ValueError(f"{source}: {name} has non-float dtype {value.dtype}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{source}: {name} contains non-finite values (NaN or inf)")


__all__ = ["SparseAutoencoder", "ARCHITECTURES", "NORMALIZATIONS", "check_sae_tensors",
           "check_finite"]
