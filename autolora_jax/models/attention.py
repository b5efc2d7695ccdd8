"""Multi-head attention's core, softmax(q k^T / sqrt(head_dim) + bias) v, in two implementations.

* 'einsum': two batched matrix products over (N, heads) and a softmax, written out. The fastest on XLA's
  CPU: its batched matmuls over leading (N, heads) run faster than the token-major layout.
* 'xla' and 'cudnn': `jax.nn.dot_product_attention` with that implementation ('cudnn': the fused kernel of
  NVIDIA GPUs, which takes float16 and bfloat16 only); 'dot_product' lets JAX choose (cuDNN's kernel on a
  GPU where it applies, XLA's otherwise). q, k and v go in at the model's compute dtype (`dtype`): a
  bfloat16 model's attention can run in cuDNN's kernel, a float32 model's runs in float32 (XLA's). On a
  2-core Intel Xeon (AVX-512), 'xla' took 1.7 times as long as 'einsum' for ViT-S/16's attention forward and
  backward (batch 32, 197 tokens).

`config.model.attention_impl` ('auto' by default) picks one per backend: `attention_for`. The implementations
give the same numbers within float round-off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# config.model.attention_impl's values.
ATTENTION_IMPLS = ('auto', 'einsum', 'xla', 'cudnn')
# What the models take: ATTENTION_IMPLS resolved ('auto' -> one of these).
IMPLEMENTATIONS = ('einsum', 'dot_product', 'xla', 'cudnn')


def attention_for(attention_impl: str, backend: str) -> str:
  """The implementation for `config.model.attention_impl` on `backend` ('cpu', 'gpu', 'tpu'): 'auto' is
  'einsum' on CPUs and 'dot_product' (JAX's choice) elsewhere; any other value is itself."""
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl={attention_impl!r}: choose one of {ATTENTION_IMPLS}.')
  if attention_impl == 'auto':
    return 'einsum' if backend == 'cpu' else 'dot_product'
  return attention_impl


def attend(q, k, v, bias=None, impl: str = 'einsum', dtype=None):
  """softmax(q k^T / sqrt(head_dim) + bias) v for each head.

  Args:
    q, k, v: (N, heads, T, head_dim).
    bias: None, or an additive bias on the logits (a relative position bias, a -100 mask of shifted
      windows): broadcastable to (N, heads, T, T), or (W, heads or 1, T, T) with W dividing N, item n taking
      bias[n % W] (the windows of each image, windows inner).
    impl: one of IMPLEMENTATIONS.
    dtype: the dtype q, k, v and bias are cast to for `jax.nn.dot_product_attention` (None: as they are);
      the einsums compute in the inputs' dtype.
  Returns:
    (N, heads, T, head_dim), the dtype of v.
  """
  n, heads, t, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
  cycle = bias.shape[0] if bias is not None and bias.ndim == 4 and bias.shape[0] not in (1, n) else 0
  if cycle and n % cycle:
    raise ValueError(f'attention bias of {cycle} per-item entries for {n} items: {cycle} must divide {n}.')
  if impl == 'einsum':
    logits = jnp.einsum('nhqd,nhkd->nhqk', q * (q.shape[-1] ** -0.5), k)
    if cycle:  # each group of `cycle` items takes the bias in turn, without repeating it N / W times
      logits = (logits.reshape(n // cycle, cycle, heads, t, s) + bias).reshape(n, heads, t, s)
    elif bias is not None:
      logits = logits + bias
    return jnp.einsum('nhqk,nhkd->nhqd', jax.nn.softmax(logits, axis=-1), v)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {impl!r}: choose one of {IMPLEMENTATIONS}.')
  dtype = jnp.dtype(dtype or q.dtype)
  to_tokens = lambda a: a.transpose(0, 2, 1, 3).astype(dtype)  # noqa: E731  (N, T, heads, head_dim)
  if bias is not None:  # the API takes a bias of N items (or 1): the per-item cycle repeated
    bias = jnp.tile(bias, (n // cycle, 1, 1, 1)) if cycle else bias
    bias = jnp.broadcast_to(bias, (n, heads, t, s)).astype(dtype)
  y = jax.nn.dot_product_attention(to_tokens(q), to_tokens(k), to_tokens(v), bias=bias,
                                   implementation=None if impl == 'dot_product' else impl)
  return y.transpose(0, 2, 1, 3).astype(v.dtype)
