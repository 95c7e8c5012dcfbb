"""The fields of a family entry: what the library knows about one Hugging Face ``model_type``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

ConfigValue = Union[None, bool, int, str, Callable[[Any], Any]]
"""A value read from the model config: a constant, a config field name (``"@field"``) or a function."""


def config_value(config: Any, value: ConfigValue) -> Any:
    """Resolve a :data:`ConfigValue` on ``config``.

    Example:
        >>> from types import SimpleNamespace
        >>> config_value(SimpleNamespace(n=3), "@n"), config_value(None, 2)
        (3, 2)
    """
    if isinstance(value, str) and value.startswith("@"):
        return getattr(config, value[1:], None)
    if callable(value):
        return value(config)
    return value


@dataclass(frozen=True)
class Norm:
    """A normalisation class of a family and its LN-rule.

    Attributes:
        cls: class name in the family's modeling module (or a full ``module.Class`` key).
        rms: True for RMSNorm (no centering), False for LayerNorm.
        weight_offset: added to the weight (Gemma multiplies by ``1 + weight``).
        float32: the norm computes internally in float32 (conservation then holds to ~1e-7
            in a float64 model, not 1e-15).
        eps: the epsilon, where the module does not store it (``OlmoLayerNorm``).
    """

    cls: str
    rms: bool = True
    weight_offset: float = 0.0
    float32: bool = True
    eps: Optional[float] = None


QK_LAYOUTS = ("all", "thirds", "per-head", "multi-query", "grouped")
"""Where the query and key columns sit in a projection's output (:attr:`Attention.layout`)."""


@dataclass(frozen=True)
class Attention:
    """How a family computes attention, which decides how the AH-rule is applied.

    Attributes:
        how: ``"interface"`` (transformers' ``AttentionInterface``: the AH-rule switches
            ``config._attn_implementation`` to a wrapper), ``"qk-columns"`` (the attention scores
            are computed in the module's own code: the AH-rule detaches the query and key columns
            of the module's public projections, given by ``projections`` and ``layout``) or
            ``"refused"`` (``relp-ah`` raises).
        cls: the attention class (for ``"qk-columns"``).
        projections: child modules of ``cls`` whose outputs hold the queries and keys.
        layout: where the query and key columns sit in each projection's output, one of
            :data:`QK_LAYOUTS` (or a config value giving one): ``"all"`` (a query or key
            projection), ``"thirds"`` (``[q | k | v]``), ``"per-head"`` (``[q k v]`` of each head
            in turn), ``"multi-query"`` (``[q_1 .. q_H | k | v]``) or ``"grouped"`` (per key/value
            group: its queries, then its key and value).
        softcap: config field of attention-score soft-capping (inside the probabilities the
            AH-rule holds constant; under ``relp`` attention takes the plain gradient).
        sliding_window: config field of a sliding window / local attention size, if any.
        alibi: position bias added to the scores (constant under the AH-rule).
    """

    how: str = "interface"
    cls: Optional[str] = None
    projections: Tuple[str, ...] = ()
    layout: ConfigValue = None
    softcap: Optional[str] = None
    sliding_window: ConfigValue = None
    alibi: ConfigValue = False


@dataclass(frozen=True)
class EdgeParts:
    """What :mod:`captum_relp.edges` needs to recompute a family over its component graph.

    Attributes:
        qkv: projection layout (or a config value giving one): ``"conv1d"`` (GPT-2 ``c_attn``),
            ``"neox"`` (one projection, rows ``[q k v]`` of each head in turn), ``"fused"`` (one
            projection, rows ``[q (all heads) | k | v]``, Phi-3, multi-query GPT-BigCode), ``"grouped"``
            (one projection, per key/value group its queries, its key, its value; Falcon), ``"codegen"``
            (``qkv_proj`` in ``mp_num`` blocks of ``[q | v | k]``) or
            ``"separate"`` (``q_proj``, ``k_proj``, ``v_proj``).
        embed: embedding modules (relative to the base model) whose outputs are summed; a
            second entry is indexed by positions.
        norms: pre-attention and pre-MLP norm of a block (``None``: the block reads the
            residual stream unnormalised, OLMo-2).
        final_norm: the final norm (relative to the base model).
        rotary: the rotary embedding (relative to the base model), if any (a config value: Falcon
            rotates only without ALiBi).
        qk_norm: norms of queries and keys (``q_norm``, ``k_norm``): ``"head"`` (per head, Qwen3,
            Gemma-3) or ``"full"`` (over all heads' queries or keys at once, OLMo-2: each head's
            query is then normalised together with the queries its own input would give the other
            heads).
        post_norms: norms of the attention and MLP outputs before the residual add ("sandwich"
            blocks, Gemma-2, OLMo-2). A node's output is then what it adds to the residual
            stream: a head's share of the post-norm's output.
        clip_qkv: config value of a clamp on queries, keys and values (OLMo ``clip_qkv``).
        qk_norm_modules: the attention's children that norm queries and keys (``qk_norm="head"``;
            ones the model does not have are skipped, e.g. Phi without ``qk_layernorm``).
        fused: the attention's child holding the fused projection (default ``query_key_value``
            for ``"neox"``, ``qkv_proj`` for ``"fused"``).
        scaling: the factor on the attention scores, or the attention's attribute holding it
            (default: ``scaling``).
        position_bias: ``f(base_model, attention_mask, batch, length, heads, dtype)``: the ALiBi
            bias added to the attention scores, broadcastable to ``(B, H, T, T)`` (held
            constant by the AH-rule; no edge passes through it).
        mlp: the block's child computing the MLP from the normalised residual, or
            ``f(block, x)`` computing it (OPT, whose block runs its MLP layers itself).
        mlp_residual: the MLP takes the residual as a second argument and adds it (BLOOM, MPT):
            it is called with zeros, so that its output is the MLP's own.
        embed_norm: a norm applied to the summed embeddings (BLOOM): the input node's output
            is the normalised embedding.
        embed_fn: ``f(base_model, ids, attention_mask)``: the input node's output, where it is
            not the sum of ``embed`` run on ids and positions (OPT: positions from the mask).
        final_proj: a projection after the final norm (OPT's ``project_out``; skipped where None).
        refuse: ``f(config)``: a reason this model's configuration has no sound edge graph, or
            ``""`` (BLOOM with ``apply_residual_connection_post_layernorm``).
        float32_scores: queries and keys are multiplied in float32: ``True`` always (GPT-Neo),
            ``"eager"`` under eager attention (GPT-J).
        rotary_style: ``"llama"`` (``apply_rotary_pos_emb(q, k, cos, sin)`` on ``(B, H, T, D)``) or
            ``"gptj"`` (``apply_rotary_pos_emb(x, sin, cos)`` on ``(B, T, H, D)``, on the first
            ``attention.rotary_dim`` columns, all where None; the rotary module returns ``(sin, cos)``).
        partial_rotary: the rotation applies to the first ``attention.rotary_ndims`` columns of
            each head only, and the family's ``apply_rotary_pos_emb`` rotates whole tensors (Phi,
            StableLM).

    A pre-norm may be a config value (a function of the config): StableLM's MLP reads the
    attention's norm under ``use_parallel_residual``, its own otherwise. Parallel blocks (attention
    and MLP reading the same residual stream) are the family's ``parallel_residual``.
    """

    qkv: ConfigValue
    embed: Tuple[str, ...]
    norms: Tuple[ConfigValue, ConfigValue]
    final_norm: str
    rotary: ConfigValue = None
    qk_norm: Optional[str] = None
    post_norms: Tuple[str, ...] = ()
    clip_qkv: ConfigValue = None
    qk_norm_modules: Tuple[str, str] = ("q_norm", "k_norm")
    partial_rotary: bool = False
    fused: str = ""
    scaling: Union[None, float, str] = None
    float32_scores: Union[bool, str] = False
    rotary_style: str = "llama"
    position_bias: Optional[Callable[..., Any]] = None
    mlp: Union[str, Callable[[Any, Any], Any]] = "mlp"
    mlp_residual: bool = False
    embed_norm: Optional[str] = None
    refuse: Optional[Callable[[Any], str]] = None
    embed_fn: Optional[Callable[..., Any]] = None
    final_proj: Optional[str] = None


@dataclass(frozen=True)
class Family:
    """Everything the library knows about one Hugging Face ``model_type``.

    Paths are attribute paths; ``blocks`` and ``final_norm`` are relative to the base model
    (``model.base_model``), the others relative to a block.

    Attributes:
        model_type: the config's ``model_type``.
        modeling: the modeling module under ``transformers.models`` (default
            ``<model_type>.modeling_<model_type>``).
        blocks: the ModuleList of blocks.
        attention: the attention module of a block.
        o_proj: the attention output projection (its input holds the heads).
        mlp: the module whose output is the MLP output (before the residual add); None when no
            module outputs it per position (then ``no_mlp`` says why).
        norms: the family's own norm classes (``torch.nn.LayerNorm`` is known already).
        gated_mlp: ``(class name, layout)``: ``"separate"`` (``gate_proj``/``up_proj``),
            ``"gate_up_proj"`` (fused, Phi-3) or ``"wi"`` (fused ``Wi``, ModernBERT).
        activations: the family's own pointwise activation classes (Identity-rule).
        structural: own classes linear in the activations (scaled embeddings, position
            embeddings, linear layers; ``"linear:"`` prefix: they take the linear rule).
        attn: how attention is computed (:class:`Attention`).
        logit_softcap: config field of final-logit soft-capping ``c * tanh(z / c)``
            (Identity-rule on the cap).
        embed_scale: token embeddings multiplied by ``sqrt(d)`` (linear: no rule needed).
        parallel_residual: attention and MLP read the same residual stream.
        heads: query heads; kv_heads: key/value heads.
        post_norms: norms applied to attention/MLP outputs before the residual add.
        qk_norms: norms of queries and keys (paths relative to a block). The attention scores
            are invariant to the scale of their input, which the LN-rule would make them linear
            in; they sit on the query/key path only, where no relevance is conserved (``relp``
            takes the softmax gradient, ``relp-ah`` holds the pattern constant), so they take the
            plain gradient under every rule set (``name_map`` can still set a rule).
        edges: the edge-graph parts (``None``: edges refused for this family, ``no_edges`` says why).
        no_edges: why the family has no edge graph.
        reuse_prefix: activation patching may run the layers below a patch once per example, with
            the patched copies created at the layer (batch-1 masks and position tensors must
            broadcast), and reuse the clean key/value cache. False: AP tiles whole inputs instead
            (the same numbers).
        encoder: bidirectional encoder (masked LM).
    """

    model_type: str
    blocks: str
    attention: str
    o_proj: str
    mlp: Optional[str]
    modeling: Optional[str] = None
    no_mlp: str = ""
    norms: Tuple[Norm, ...] = ()
    gated_mlp: Optional[Tuple[str, str]] = None
    activations: Tuple[str, ...] = ()
    structural: Tuple[str, ...] = ()
    attn: Attention = Attention()
    logit_softcap: Optional[str] = None
    embed_scale: bool = False
    parallel_residual: ConfigValue = False
    heads: ConfigValue = "@num_attention_heads"
    kv_heads: ConfigValue = None
    post_norms: bool = False
    qk_norms: Tuple[str, ...] = ()
    edges: Optional[EdgeParts] = None
    no_edges: str = ""
    reuse_prefix: bool = True
    encoder: bool = False

    @property
    def module(self) -> str:
        """The full name of the modeling module."""
        return "transformers.models." + (self.modeling or f"{self.model_type}.modeling_{self.model_type}")

    def key(self, cls: str) -> str:
        """The registry key of a class named in this entry."""
        return cls if "." in cls else f"{self.module}.{cls}"

    def num_heads(self, config: Any) -> int:
        """Query heads of a model with this ``config``."""
        return int(config_value(config, self.heads))

    def num_kv_heads(self, config: Any) -> int:
        """Key/value heads (the query heads when the family has no grouped-query attention)."""
        value = config_value(config, self.kv_heads)
        return self.num_heads(config) if value is None else int(value)

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP of a block read the same residual stream."""
        return bool(config_value(config, self.parallel_residual))

    def window(self, config: Any) -> Optional[int]:
        """The sliding-window / local-attention size of the model, if any layer has one."""
        value = config_value(config, self.attn.sliding_window)
        return int(value) if value else None


__all__ = ["QK_LAYOUTS", "Attention", "ConfigValue", "EdgeParts", "Family", "Norm", "config_value"]
