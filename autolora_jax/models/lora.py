"""The convolution that carries AutoLoRa's low-rank branch: W for branch 'adv', W + dW for branch 'nat'.

The convolution itself is an argument (`LoRaConv.conv_fn`, XLA's by default), so that a caller can run
the same parameters through another implementation (autolora_jax.ops has CPU ones) without the model
knowing of it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# conv_fn(x, kernel, stride, padding) -> y: NHWC x HWIO -> NHWC, symmetric explicit padding.
ConvFn = Callable[[jax.Array, jax.Array, int, int], jax.Array]


def native_conv2d(x, kernel, stride: int, padding: int):
  """XLA's convolution, NHWC x HWIO -> NHWC, with `padding` on every side (as torch.nn.Conv2d)."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """torchvision's ResNet conv init: N(0, 2 / fan_out), fan_out = k * k * C_out (HWIO kernel)."""
  kh, kw, _, c_out = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (kh * kw * c_out))


def lora_delta(lora_a, lora_b, kernel_shape, scale):
  """dW in Flax's HWIO layout, computed in PyTorch's order as docs/method.md defines it.

  Args:
    lora_a: (rank * k, C_in * k).
    lora_b: (C_out * k, rank * k).
    kernel_shape: the HWIO shape (k, k, C_in, C_out) of the convolution's kernel.
    scale: alpha / rank.
  Returns:
    reshape(B @ A, (C_out, C_in, k, k)) * scale, transposed to (k, k, C_in, C_out).
  """
  kh, kw, c_in, c_out = kernel_shape
  delta = (lora_b @ lora_a).reshape(c_out, c_in, kh, kw) * scale
  return delta.transpose(2, 3, 1, 0)


class LoRaConv(nn.Module):
  """A bias-free convolution whose kernel W may carry a LoRa branch (rank > 0).

  Attributes:
    features: C_out.
    kernel_size: k (square kernels).
    strides, padding: as torch.nn.Conv2d (symmetric explicit padding).
    rank: LoRa rank r; 0 means a plain convolution without LoRa parameters.
    alpha: LoRa scaling numerator, dW is scaled by alpha / rank.
    conv_fn: the convolution, `ConvFn`; any implementation of the same function (parameters and
      results do not depend on it, up to float rounding).
    dtype: compute dtype (input and kernel are cast to it; parameters stay float32). Below float32
      (bfloat16), branch 'nat' computes conv(x, W) + conv(x, dW) in float32 and returns float32: the
      small dW of early training (mean |dW| / |W| about 1e-3 after a first step) is its own operand, not
      rounded into W + dW, and the natural branch's activations, which carry its effect from layer to
      layer, are not rounded to bfloat16's 8 bits in between (tests/test_bfloat16.py). That costs the
      natural forward float32 speed in its LoRa layers; the adversarial branch (PGD, the deployed model)
      stays in `dtype`.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  rank: int = 0
  alpha: float = 1.0
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, branch='adv'):
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features)
    kernel = self.param('kernel', kaiming_normal_fan_out, shape)
    if self.rank > 0:
      lora_a = self.param('lora_A', nn.initializers.normal(1.0), (self.rank * k, shape[2] * k))
      lora_b = self.param('lora_B', nn.initializers.zeros, (self.features * k, self.rank * k))
      if branch == 'nat':
        delta = lora_delta(lora_a, lora_b, shape, self.alpha / self.rank)
        if jnp.finfo(self.dtype).bits < 32:
          x = x.astype(jnp.float32)
          return sum(self.conv_fn(x, w, self.strides, self.padding) for w in (kernel, delta))
        kernel = kernel + delta
    return self.conv_fn(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
