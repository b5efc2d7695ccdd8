"""Convolutions and max-pooling written for speed on CPUs, with the same results as XLA's own ops.

XLA's CPU backend runs some convolutions and gradients far below what the machine can do: the input
gradient of a convolution (a convolution with the kernel's input and output axes swapped) sometimes gets
a kernel layout that falls back to a generic loop (200 ms where the forward takes 10 ms, inside the
AutoLoRa train step of ResNet-18), strided input gradients become slow "lhs-dilated" convolutions, and
the gradient of a max-pool becomes a select-and-scatter that cost a third of a PGD step at 224 x 224.
Everything here is plain jax.numpy and lax, so any backend runs it; ops.cpu picks it on CPUs only.
Layouts: NHWC inputs, HWIO kernels, square windows, symmetric padding.

* `tap_views` / `scatter_taps`: the k*k strided views of a padded input that a k x k window with stride s
  reads, and the exact transpose of that (summing per-tap arrays back onto the input grid), written per
  stride phase so that XLA fuses it into a few elementwise loops.
* `im2col_conv`: the k*k tap views concatenated along channels and one matmul (1 x 1 kernels: the matmul
  alone); far faster than XLA's convolution on CPUs for small feature maps.
* `conv_explicit`: XLA's forward convolution (`xla_conv`) with the gradients written out: for the input,
  a stride-1 convolution with the flipped, transposed kernel materialised in HWIO order (stride 1) or one
  matmul followed by `scatter_taps` (strided); for the kernel, XLA's own rule (`conv_kernel_grad`).
* `max_pool`: max-pooling whose gradient goes, as PyTorch's and XLA's do (`xla_max_pool`), to the first
  maximum of each window in row-major order.
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def out_size(size: int, k: int, stride: int, padding: int) -> int:
  """Output side of a window of side k with stride and symmetric padding."""
  return (size + 2 * padding - k) // stride + 1


def tap_views(xp, k: int, stride: int, out_hw: Sequence[int]) -> List[jax.Array]:
  """The k*k views xp[:, i + stride * o, j + stride * p] (row-major over i, j) of a padded NHWC input."""
  ho, wo = out_hw
  return [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
          for i in range(k) for j in range(k)]


def scatter_taps(taps: Sequence[jax.Array], k: int, stride: int, padded_hw: Sequence[int]):
  """The transpose of `tap_views`: sum over taps t = (i, j) of taps[t] placed at (i + s*o, j + s*p).

  Args:
    taps: k*k arrays (N, Ho, Wo, C), row-major over the window.
    k, stride: window side and stride.
    padded_hw: (Hp, Wp), the side of the padded input the views were taken from.
  Returns:
    (N, Hp, Wp, C).
  """
  n, ho, wo, c = taps[0].shape
  hp, wp = padded_hw
  s = stride
  blocks_h, blocks_w = -(-hp // s), -(-wp // s)
  zero = jnp.zeros((), taps[0].dtype)
  phases = []
  for bh in range(s):
    row = []
    for bw in range(s):
      acc = None
      for i in range(bh, k, s):
        for j in range(bw, k, s):
          a, b = i // s, j // s
          placed = lax.pad(taps[i * k + j], zero, ((0, 0, 0), (a, blocks_h - ho - a, 0),
                                                   (b, blocks_w - wo - b, 0), (0, 0, 0)))
          acc = placed if acc is None else acc + placed
      row.append(jnp.zeros((n, blocks_h, blocks_w, c), taps[0].dtype) if acc is None else acc)
    phases.append(jnp.stack(row, axis=3))  # (N, Bh, Bw, s_w, C)
  grid = jnp.stack(phases, axis=2)  # (N, Bh, s_h, Bw, s_w, C)
  return grid.reshape(n, blocks_h * s, blocks_w * s, c)[:, :hp, :wp]


def xla_conv(x, kernel, stride: int, padding: int):
  """XLA's convolution with `padding` on every side (the model's default convolution, as an op here)."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                  dimension_numbers=DIMENSION_NUMBERS)


def xla_max_pool(x, k: int, stride: int, padding: int):
  """XLA's max-pooling (reduce-window, via Flax), the model's default; `max_pool` has its values."""
  return nn.max_pool(x, (k, k), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


def im2col_conv(x, kernel, stride: int, padding: int):
  """The convolution as one matmul: (N, Ho, Wo, k*k*C_in) tap views, row-major over the window, times
  the kernel reshaped to (k*k*C_in, C_out). Gradients are JAX's (slices and a matmul)."""
  k, _, c_in, c_out = kernel.shape
  if k == 1 and padding == 0:
    return x[:, ::stride, ::stride, :] @ kernel.reshape(c_in, c_out)
  out_hw = [out_size(side, k, stride, padding) for side in x.shape[1:3]]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  patches = tap_views(xp, k, stride, out_hw)
  return jnp.concatenate(patches, axis=-1) @ kernel.reshape(k * k * c_in, c_out)


def conv_input_grad(g, kernel, stride: int, padding: int, in_hw: Sequence[int]):
  """d(conv(x, kernel))/dx applied to the output cotangent g (N, Ho, Wo, C_out) -> (N, H, W, C_in)."""
  k, _, c_in, c_out = kernel.shape
  h, w = in_hw
  if stride == 1 and padding <= k - 1 and out_size(h, k, 1, padding) == g.shape[1]:
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (k, k, C_out, C_in), materialised
    q = k - 1 - padding
    return lax.conv_general_dilated(g, flipped, (1, 1), ((q, q), (q, q)), dimension_numbers=DIMENSION_NUMBERS)
  # Strided: one matmul gives every tap's contribution, scatter_taps puts them back on the input grid.
  n, ho, wo, _ = g.shape
  contrib = (g.reshape(-1, c_out) @ kernel.reshape(k * k * c_in, c_out).T).reshape(n, ho, wo, k * k, c_in)
  taps = [contrib[:, :, :, t] for t in range(k * k)]
  dxp = scatter_taps(taps, k, stride, (h + 2 * padding, w + 2 * padding))
  return dxp[:, padding:padding + h, padding:padding + w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_explicit(x, kernel, stride: int, padding: int):
  """XLA's convolution (NHWC x HWIO, symmetric padding) with the gradients written out (module docstring)."""
  return xla_conv(x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
  return xla_conv(x, kernel, stride, padding), (x, kernel)


def conv_kernel_grad(x, g, kernel_shape, stride: int, padding: int):
  """d(conv(x, kernel))/dkernel applied to g (N, Ho, Wo, C_out) -> (k, k, C_in, C_out): XLA's own rule."""
  _, vjp = jax.vjp(lambda w: xla_conv(x, w, stride, padding), jnp.zeros(kernel_shape, x.dtype))
  return vjp(g)[0]


def _conv_bwd(stride, padding, res, g):
  x, kernel = res
  dx = conv_input_grad(g, kernel, stride, padding, x.shape[1:3])
  # Unused kernel gradients (PGD differentiates with respect to the input only) are removed by XLA.
  dw = conv_kernel_grad(x, g, kernel.shape, stride, padding).astype(kernel.dtype)
  return dx.astype(x.dtype), dw


conv_explicit.defvjp(_conv_fwd, _conv_bwd)


def _pool_views(x, k, stride, padding):
  ho, wo = (out_size(s, k, stride, padding) for s in x.shape[1:3])
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
  return tap_views(xp, k, stride, (ho, wo))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, k: int, stride: int, padding: int):
  """k x k max-pooling with stride and symmetric -inf padding of NHWC x (PyTorch's MaxPool2d)."""
  views = _pool_views(x, k, stride, padding)
  return functools.reduce(jnp.maximum, views)


def _pool_fwd(x, k, stride, padding):
  y = max_pool(x, k, stride, padding)
  return y, (x, y)


def _pool_bwd(k, stride, padding, res, g):
  x, y = res
  free = None
  taps = []
  for view in _pool_views(x, k, stride, padding):
    hit = view == y if free is None else jnp.logical_and(free, view == y)
    free = jnp.logical_not(hit) if free is None else jnp.logical_and(free, jnp.logical_not(hit))
    taps.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
  h, w = x.shape[1:3]
  dxp = scatter_taps(taps, k, stride, (h + 2 * padding, w + 2 * padding))
  return (dxp[:, padding:padding + h, padding:padding + w],)


max_pool.defvjp(_pool_fwd, _pool_bwd)
