"""``jflash.linen``: a Flax Linen multi-head attention layer computed by jflash.

``jflash.linen.MultiHeadAttention`` has the parameters of
``flax.linen.MultiHeadDotProductAttention`` (``query``, ``key``, ``value``, ``out``
DenseGeneral kernels/biases of the same shapes when ``num_kv_heads == num_heads``), so a
checkpoint of one loads into the other, and adds jflash's options: grouped-query
attention (``num_kv_heads``), ``is_causal``, ``local_window_size``, ``logits_soft_cap``,
``implementation``, and per-call padding lengths and segment ids instead of dense masks.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jflash._src.flax_adapter import attend

__all__ = ["MultiHeadAttention"]

Array = Any
Dtype = Any
Initializer = Callable[..., Any]


class MultiHeadAttention(nn.Module):
  """Multi-head (or grouped-query) dot-product attention, computed by jflash.

  Attributes (Flax's meaning unless noted):
    num_heads: number of query heads.
    dtype, param_dtype: computation and parameter dtypes.
    qkv_features: total q/k/v projection width (default: the input width);
      ``head_dim = qkv_features // num_heads``.
    out_features: output width (default: the width of ``inputs_q``).
    dropout_rate, deterministic: attention dropout. jflash raises NotImplementedError
      for ``dropout_rate > 0`` in non-deterministic calls until its kernels have dropout.
    precision: precision of the projections (the attention picks its own by dtype).
    kernel_init, bias_init, out_kernel_init, out_bias_init, use_bias: projections.
    normalize_qk: LayerNorm on q and k (parameters ``query_ln``, ``key_ln``), as Flax.
    num_kv_heads: jflash: key/value heads (GQA/MQA); must divide ``num_heads``.
      Default ``num_heads``.
    is_causal: jflash: causal self-attention (key j visible from query i iff j <= i).
    local_window_size: jflash: ``w`` or ``(left, right)``: key j visible from query i iff
      ``i - left <= j <= i + right``.
    logits_soft_cap: jflash: logits become ``cap * tanh(logits / cap)``.
    implementation: jflash backend: ``"mosaic"``, ``"triton"``, ``"xla"`` or None (best).
  """

  num_heads: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  out_kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()
  out_bias_init: Initializer | None = None
  use_bias: bool = True
  normalize_qk: bool = False
  num_kv_heads: int | None = None
  is_causal: bool = False
  local_window_size: int | tuple[int, int] | None = None
  logits_soft_cap: float | None = None
  implementation: str | None = None

  @nn.compact
  def __call__(
      self,
      inputs_q: Array,
      inputs_k: Array | None = None,
      inputs_v: Array | None = None,
      *,
      segment_ids: Array | tuple[Array, Array] | None = None,
      query_seq_lengths: Array | None = None,
      key_value_seq_lengths: Array | None = None,
      mask: Array | None = None,
      deterministic: bool | None = None,
      dropout_rng: Array | None = None,
  ):
    """Attention of ``inputs_q [batch..., T, F]`` over ``inputs_k``/``inputs_v [batch..., S, F']``.

    ``inputs_k`` defaults to ``inputs_q`` and ``inputs_v`` to ``inputs_k`` (as Flax).
    ``query_seq_lengths``/``key_value_seq_lengths`` ``[batch...]``: rows/keys at or past the
    length are padding (a padding query row returns the output bias only, its attention
    being zero). ``segment_ids``: ``[batch..., T]`` (self attention) or a pair
    ``([batch..., T], [batch..., S])``: queries only see keys of the same segment.
    ``mask``: an optional Flax-style mask ``[batch..., N or 1, T, S]`` (True/1 visible);
    it makes jflash use its dense fallback until the kernels take masks, so prefer the
    structured arguments. Returns ``[batch..., T, out_features]``.
    """
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_k cannot be None when inputs_v is given")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k

    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if qkv_features % self.num_heads:
      raise ValueError(f"qkv_features={qkv_features} must be divisible by num_heads={self.num_heads}")
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    head_dim = qkv_features // self.num_heads

    def proj(heads, name):
      return nn.DenseGeneral(
          features=(heads, head_dim), axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
          precision=self.precision, name=name)

    query = proj(self.num_heads, "query")(inputs_q)
    key = proj(num_kv_heads, "key")(inputs_k)
    value = proj(num_kv_heads, "value")(inputs_v)
    if self.normalize_qk:
      query = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)(query)
      key = nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype)(key)

    dropout_rate = 0.0
    if self.dropout_rate > 0.0:
      if not nn.merge_param("deterministic", self.deterministic, deterministic):
        dropout_rate = self.dropout_rate
        if dropout_rng is None:
          dropout_rng = self.make_rng("dropout")
    x = attend(
        query, key, value, mask=mask, is_causal=self.is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=segment_ids, local_window_size=self.local_window_size,
        logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng if dropout_rate else None)
    return nn.DenseGeneral(
        features=features, axis=(-2, -1), kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        name="out")(x)
