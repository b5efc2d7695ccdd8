"""Winograd convolution F(m x m, 3 x 3) for 3 x 3, stride-1, padding-1 convolutions (used on CPUs).

A 3 x 3 convolution computed tile by tile: each (m + 2) x (m + 2) input tile d and the kernel g are
transformed, V = B^T d B and U = G g G^T, multiplied elementwise over the tile and summed over input
channels (for every one of the (m + 2)^2 tile positions one matmul (N*T*T, C_in) @ (C_in, C_out)), and
transformed back, Y = A^T M A, to an m x m output tile. This needs 9 m^2 / (m + 2)^2 times fewer
multiplications than the direct convolution (m = 2: 2.25 times; m = 4: 4 times), at the price of the
transforms (elementwise sums over strided views, which XLA fuses) and rounding a few times the direct
one's (benchmarks: relative error ~6e-7 for m = 2, ~6e-6 for m = 4 on random data, float32). Lower
precision inputs (bfloat16) are computed in float32 and rounded at the end.

XLA's CPU convolutions run the ResNet-18 3 x 3 layers at 14 x 14 and 28 x 28 at about the speed of a plain
matmul of the direct convolution's size; F(2 x 2) is a third faster there (layer timings in ops/cpu.py).
GPUs and TPUs have their own convolution algorithms, so ops.cpu picks this on CPUs only.

`conv3x3(x, kernel, m)` is differentiable: the input gradient of a stride-1, padding-1 3 x 3 convolution is
the same convolution of the output cotangent with the flipped kernel (input and output channels swapped),
so it also runs as F(m x m, 3 x 3); the kernel gradient is XLA's own rule (ops.conv.conv_kernel_grad).
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from autolora_jax.ops import conv

# (B^T, G, A^T) of F(m x m, 3 x 3), interpolation points 0, +-1 (m = 2) and 0, +-1, +-2 (m = 4), and infinity.
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])),
}


def _combine(coefficients, terms):
  """sum_k coefficients[k] * terms[k], skipping zeros and writing +-1 as additions."""
  out = None
  for c, term in zip(coefficients, terms):
    if c == 0:
      continue
    v = term if c == 1 else (-term if c == -1 else term * jnp.asarray(c, term.dtype))
    out = v if out is None else out + v
  return out


def _check_tile(m: int):
  if m not in TRANSFORMS:
    raise ValueError(f'Winograd tile must be one of {sorted(TRANSFORMS)}, got {m!r}.')


def kernel_transform(kernel, m: int) -> List[jax.Array]:
  """U = G g G^T for an HWIO kernel (3, 3, C_in, C_out): (m + 2)^2 arrays (C_in, C_out), row-major."""
  _check_tile(m)
  g = TRANSFORMS[m][1]
  rows = [_combine(g[a], [kernel[i] for i in range(3)]) for a in range(m + 2)]  # (3, C_in, C_out) each
  return [_combine(g[b], [r[j] for j in range(3)]) for r in rows for b in range(m + 2)]


def input_transform(x, m: int) -> List[jax.Array]:
  """V = B^T d B for every input tile d of x (N, H, W, C) padded by 1 (and on the far side up to whole tiles).

  Returns (m + 2)^2 arrays (N * Th * Tw, C), row-major over the tile position; Th = ceil(H / m), Tw likewise.
  """
  bt = TRANSFORMS[m][0]
  a = m + 2
  n, h, w, c = x.shape
  th, tw = -(-h // m), -(-w // m)
  xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
  rows_in = [xp[:, k:k + m * (th - 1) + 1:m] for k in range(a)]  # (N, Th, Wp, C)
  rows = [_combine(bt[i], rows_in) for i in range(a)]
  out = []
  for r in rows:
    cols = [r[:, :, k:k + m * (tw - 1) + 1:m] for k in range(a)]  # (N, Th, Tw, C)
    out += [_combine(bt[j], cols).reshape(n * th * tw, c) for j in range(a)]
  return out


def output_transform(products: Sequence[jax.Array], m: int, shape: Sequence[int]):
  """Y = A^T M A: (m + 2)^2 arrays (N * Th * Tw, C_out) -> the output (N, H, W, C_out) of `shape`."""
  at = TRANSFORMS[m][2]
  a = m + 2
  n, h, w, c = shape
  th, tw = -(-h // m), -(-w // m)
  prods = [p.reshape(n, th, tw, c) for p in products]
  cols = [[_combine(at[i], [prods[k * a + b] for k in range(a)]) for b in range(a)] for i in range(m)]
  tiles = [jnp.stack([_combine(at[j], cols[i]) for j in range(m)], axis=3) for i in range(m)]
  y = jnp.stack(tiles, axis=2)  # (N, Th, m, Tw, m, C)
  return y.reshape(n, th * m, tw * m, c)[:, :h, :w]


def _conv(x, kernel, m, transposed=False):
  """F(m x m, 3 x 3) of x with `kernel`, or with its input and output channels swapped (transposed=True)."""
  n, h, w, _ = x.shape
  # At least float32: the transforms' sums cancel, which bfloat16's 8-bit mantissa would turn into noise.
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  v = input_transform(x.astype(dtype), m)
  u = kernel_transform(kernel.astype(dtype), m)
  # The swapped kernel is read as the transposed operand of each matmul (no transpose of the kernel).
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  c_out = kernel.shape[2] if transposed else kernel.shape[3]
  y = output_transform([lax.dot_general(vi, ui, dims) for vi, ui in zip(v, u)], m, (n, h, w, c_out))
  # Materialised here: fused into a consumer's reduction (BatchNorm's batch statistics), the interleaving
  # of the output tiles made each such reduction ~10 times slower than reading y.
  return lax.optimization_barrier(y.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x, kernel, m: int = 2):
  """The 3 x 3, stride-1, padding-1 convolution NHWC x HWIO -> NHWC as F(m x m, 3 x 3), m in (2, 4)."""
  _check_tile(m)
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'winograd.conv3x3 needs a 3 x 3 kernel, got HWIO shape {kernel.shape}.')
  return _conv(x, kernel, m)


def _fwd(x, kernel, m):
  return conv3x3(x, kernel, m), (x, kernel)


def _bwd(m, res, g):
  x, kernel = res
  dx = _conv(g, jnp.flip(kernel, (0, 1)), m, transposed=True)
  # Unused kernel gradients (PGD differentiates with respect to the input only) are removed by XLA.
  dw = conv.conv_kernel_grad(x, g, kernel.shape, 1, 1)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


conv3x3.defvjp(_fwd, _bwd)
