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
    return self._normalize(x, self._variables(x.shape[-1]), adapt=True)

  def _variables(self, c: int, prefix: str = ''):
    """(scale, bias, running mean, running var) named prefix + 'scale', 'bias' (params), 'mean', 'var'."""
    return (self.param(prefix + 'scale', nn.initializers.ones, (c,)),
            self.param(prefix + 'bias', nn.initializers.zeros, (c,)),
            self.variable('batch_stats', prefix + 'mean', lambda: jnp.zeros((c,), jnp.float32)),
            self.variable('batch_stats', prefix + 'var', lambda: jnp.ones((c,), jnp.float32)))

  def _normalize(self, x, variables, adapt: bool):
    """Normalises x with `variables`: with adapt=True in training, by the batch statistics (and updates
    the running ones); else by the running statistics."""
    scale, bias, ra_mean, ra_var = variables
    if adapt and not self.use_running_average:
      # float32 for float32 and bfloat16 inputs; float64 ones (a float64 reference) stay float64.
      compute = jnp.promote_types(x.dtype, jnp.float32)
      mean, var, count = batch_statistics(x.astype(compute), self.axis_name)
      if not self.is_initializing():
        update_running(ra_mean, ra_var, mean, var, count, self.momentum)
    else:
      mean, var = ra_mean.value, ra_var.value
    return normalize(x, mean, var, scale, bias, self.epsilon)


TWIN_MODES = ('adaptive', 'frozen', 'mix')
FROZEN_PREFIX = 'frozen_'  # the frozen twin's variables: frozen_scale, frozen_bias, frozen_mean, frozen_var


class TwinBatchNorm(BatchNorm):
  """TWINS's doubled BatchNorm: an adaptive BN (`BatchNorm` itself, same variable names) and a frozen twin.

  The frozen BN always normalises with its own running mean and variance ('frozen_mean', 'frozen_var'),
  which nothing ever updates, and has its own trainable 'frozen_scale' and 'frozen_bias'; both BNs start
  from the pre-trained BN (`pretrain.transplant` fills each frozen variable from its adaptive twin).
  `mode`: 'adaptive' (the ordinary BatchNorm; the deployed model), 'frozen', or 'mix', the authors' training
  layout: the first half of the batch (N // 2 rows) through the frozen BN, the rest through the adaptive
  one, whose batch statistics then cover that second half alone (over the devices of `axis_name`).
  """
  mode: str = 'adaptive'

  @nn.compact
  def __call__(self, x):
    if self.mode not in TWIN_MODES:
      raise ValueError(f'TwinBatchNorm mode must be one of {TWIN_MODES}, got {self.mode!r}.')
    adaptive = self._variables(x.shape[-1])
    frozen = self._variables(x.shape[-1], FROZEN_PREFIX)
    if self.mode == 'adaptive':
      return self._normalize(x, adaptive, adapt=True)
    if self.mode == 'frozen':
      return self._normalize(x, frozen, adapt=False)
    half = x.shape[0] // 2
    return jnp.concatenate([self._normalize(x[:half], frozen, adapt=False),
                            self._normalize(x[half:], adaptive, adapt=True)], axis=0)


def frozen_twin_source(name: str) -> Optional[str]:
  """The adaptive variable a frozen twin variable starts from ('frozen_mean' -> 'mean'), else None."""
  return name[len(FROZEN_PREFIX):] if name.startswith(FROZEN_PREFIX) else None
