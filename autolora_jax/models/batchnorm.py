"""BatchNorm2d with PyTorch's semantics, synchronised over a mapped axis."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def batch_statistics(xf, axis_name: Optional[str]):
  """(mean, biased var, count) per channel of NHWC xf over N, H, W and the devices of `axis_name`.

  One collective per call (and one in its gradient): each device's two-pass (mean, var) of its own rows,
  gathered and merged with equal weights (every device holds the same count), var = mean_i(var_i) +
  mean_i((mean_i - mean)^2); no difference of large sums, so as exact as one device's two passes.
  """
  count = xf.shape[0] * xf.shape[1] * xf.shape[2]
  mean = jnp.mean(xf, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))  # two passes: exact for large activations
  if axis_name is not None:
    stats = lax.all_gather(jnp.stack([mean, var]), axis_name)  # (devices, 2, C)
    mean = jnp.mean(stats[:, 0], axis=0)
    var = jnp.mean(stats[:, 1], axis=0) + jnp.mean(jnp.square(stats[:, 0] - mean), axis=0)
    count = count * stats.shape[0]
  return mean, var, count


def update_running(ra_mean, ra_var, mean, var, count, momentum: float):
  """PyTorch's running-statistics update: the unbiased batch variance, Flax's momentum convention."""
  unbiased = var * (count / jnp.maximum(count - 1, 1))
  ra_mean.value = momentum * ra_mean.value + (1.0 - momentum) * mean
  ra_var.value = momentum * ra_var.value + (1.0 - momentum) * unbiased


def normalize(x, mean, var, scale, bias, epsilon: float):
  """scale * (x - mean) / sqrt(var + eps) + bias, computed in at least float32, returned in x's dtype."""
  compute = jnp.promote_types(x.dtype, jnp.float32)
  mul = scale * lax.rsqrt(var + epsilon)
  # Normalised in float32 whatever x's dtype: in training, BatchNorm's input gradient is a difference
  # of nearly equal terms, which bfloat16 would turn into noise (30% error in every FE gradient).
  return (x.astype(compute) * mul + (bias - mean * mul)).astype(x.dtype)


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's semantics (eps 1e-5, momentum 0.1 in PyTorch terms).

  Normalises with the biased batch variance and updates the running variance with the unbiased one,
  as torch.nn.BatchNorm2d does (Flax's own BatchNorm stores the biased one). Statistics and the
  normalisation are computed in at least float32 (the output has x's dtype); statistics are reduced
  across the devices of `axis_name` (synchronised BatchNorm), so that any number of devices
  computes what one device computes on the whole batch.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    # float32 for float32 and bfloat16 inputs; float64 ones (a float64 reference) stay float64.
    compute = jnp.promote_types(x.dtype, jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, count = batch_statistics(x.astype(compute), self.axis_name)
      if not self.is_initializing():
        update_running(ra_mean, ra_var, mean, var, count, self.momentum)
    return normalize(x, mean, var, scale, bias, self.epsilon)
