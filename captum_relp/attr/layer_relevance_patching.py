"""Relevance Patching (RelP) as a Captum layer attribution method."""
from __future__ import annotations

from ._gradient_x_difference import LayerGradientXDifference


class LayerRelevancePatching(LayerGradientXDifference):
    r"""Relevance Patching (RelP, Jafari et al. 2025) for one or several layers.

    RelP approximates activation patching like attribution patching (AtP) does,
    with two forward passes and one backward pass, but replaces the gradient by
    the LRP propagation coefficient :math:`\rho`: the forward pass is unchanged
    while the backward pass follows LRP rules (LN-rule, Identity-rule, Half-rule,
    optionally the AH-rule; see :mod:`captum_relp.rules`).

    Sign convention (Captum's): with ``inputs`` = clean and ``baselines`` =
    corrupt prompts, the returned attribution of a layer activation :math:`n` is

    .. math:: (n(x_{clean}) - n(x_{corrupt})) \odot \rho(\mathcal{L}(x_{clean})),

    i.e. minus the paper's :math:`\hat c_{RelP}(n)` (Eq. 3), which uses
    :math:`n(x_{patch}) - n(x_{original})`. Summed over a component it approximates
    :math:`\mathcal{L}(x_{clean}) - \mathcal{L}(x_{clean} \mid do(n \leftarrow n(x_{corrupt})))`:
    a positive score means corrupting the component lowers the metric.
    ``direction="denoising"`` evaluates :math:`\rho` on the ``baselines`` run instead
    (approximating the effect of patching clean activations into the corrupt run).
    Without ``baselines`` the plain LRP relevance :math:`n(x) \odot \rho` is returned.

    Args:
        forward_func (Callable or nn.Module): the model, or a function returning a
            tensor. For a Hugging Face ``PreTrainedModel`` the output's ``.logits`` is used.
        layer (nn.Module or list of nn.Module): the layer(s) attributed; a list is
            attributed in one clean forward, one corrupt forward and one backward pass.
        rules (str, RuleSet or CalibratedRules): ``"relp"`` (the paper's Table 4: LN +
            Identity + 0-rule, Half-rule on gated MLPs), ``"relp-ah"`` (plus AH-rule),
            ``"none"`` (plain gradients, i.e. attribution patching), or the outcome of
            :func:`~captum_relp.calibrate_rules` (one rules-applied forward and backward
            pass per distinct chosen rule set). Default: ``"relp"``.
        multiply_by_inputs (bool): if False, return the propagation coefficients only.
        model (nn.Module, optional): the module to apply rules to when
            ``forward_func`` is a plain function. Default: ``forward_func`` itself.
        strict (bool): raise if a normalisation/activation module has no rule
            (default); if False, warn and use plain gradients there.

    Examples::

        >>> import torch
        >>> from captum_relp import LayerRelevancePatching
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        >>> clean, corrupt = torch.randn(2, 4), torch.randn(2, 4)
        >>> relp = LayerRelevancePatching(net, net[1])
        >>> relp.attribute(clean, baselines=corrupt, target=0).shape
        torch.Size([2, 8])
    """


__all__ = ["LayerRelevancePatching"]
