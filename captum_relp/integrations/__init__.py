"""Integrations with the libraries people run their models and SAEs through.

* :func:`unwrap_model`: nnsight models and envoys, and
  ``DistributedDataParallel``/``DataParallel`` wrappers, are unwrapped to the torch
  module wherever a model or layer is expected;
* accelerate: rules run inside accelerate's offload hooks (they patch
  ``_old_forward`` when a module has ``_hf_hook``), so models dispatched with a
  ``device_map`` (CPU and disk offload included) give the scores of the plain model;
* :mod:`~captum_relp.integrations.distributed`: sharding prompt sweeps across
  ``torchrun`` ranks;
* TransformerLens: hook-based rules on HookPoints (:mod:`captum_relp.rules.hookpoint`),
  registered by TransformerLens class name in the rule registry.
"""
from .._forward import unwrap_layers, unwrap_model

__all__ = ["unwrap_model", "unwrap_layers"]
