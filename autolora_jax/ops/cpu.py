"""Which convolution runs where: `config.model.conv_impl` -> the (conv_fn, pool_fn) a model is built with.

* 'native': XLA's convolution and max-pool (the model's defaults);
* 'im2col', 'explicit': ops.conv's `im2col_conv`, `conv_explicit`, for every layer;
* 'winograd': Winograd F(m x m, 3 x 3) for the 3 x 3 stride-1 convolutions, 'explicit' for the others;
* 'auto': on CPUs chosen per layer (`choose_conv`) from the shapes the convolution is called with (static
  at trace time); elsewhere 'native'.
Every choice but 'native' pools with ops.conv.max_pool. The backend is an argument of `convolutions`,
asked for once where the model is built, never at trace time.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from autolora_jax.ops import conv, winograd

CONV_IMPLS = ('auto', 'native', 'im2col', 'explicit', 'winograd')

# On CPUs (2-core AMD EPYC machines, benchmarks/step.py and layer timings, XLA's own convolution kernels as
# host.set_xla_cpu_flags selects them): XLA's native convolution is as fast as a matmul for outputs of 4 x 4
# and more but pathological for the smallest ones (2 x 2 outputs with 256 channels, batch 32: 27 ms where
# im2col takes 1.3 ms), and its input gradients of strided convolutions are slow (the ResNet-18 stem at 224:
# 196 ms, 91 ms written out); so 'auto' uses im2col up to 3 x 3 outputs and for 1 x 1 kernels (a matmul),
# Winograd for the 3 x 3 stride-1 convolutions whose output side `winograd_tile` gives a tile, and the
# native forward with explicit gradients (conv.conv_explicit) for the rest.
IM2COL_MAX_SIDE = 3

# Winograd tile m of F(m x m, 3 x 3) by output side: (below, m) pairs, smallest first; 0: no Winograd.
# ResNet-18 at 224, batch 32, one 3 x 3 stride-1 layer forward, min of 7, ms (XLA's convolution / F(2 x 2) /
# F(4 x 4); the input gradient is the same computation): 56 x 56 x 64: 52 / 41 / 42; 28 x 28 x 128:
# 50 / 34 / 25; 14 x 14 x 256: 47 / 30 / 45 (F(4 x 4) has 16 tiles per image there: 512-row matmuls);
# 7 x 7 x 512: 47 / 31 / 33. Smaller layers: 8 x 8 x 64 and 4 x 4 x 128 all within 0.3 ms of each other,
# 6 x 6 x 256: 10 / 6 / 11. Whole model, one process alternating (min of 4): PGD step (forward and input
# gradient) 2.17 -> 2.01 s, the train step's two training passes 7.6 -> 7.0 s.
WINOGRAD_TILES = ((4, 0), (20, 2), (40, 4), (None, 2))

# Narrow layers (the demo's and the tests' networks): below this many channels (the wider of input and
# output), 'auto' uses im2col for every convolution. Their matmuls are small, and Winograd's and the
# explicit gradients' extra programs cost more compile time than they save: ResNet-18, CIFAR stem, batch
# 64, 2-core AMD EPYC, train step / validation pass img/s (compile s): width 16 at 16 x 16, per-layer
# choice 117 / 176 (37 / 18 s), im2col 122 / 182 (21 / 11 s); width 8 at 28 x 28, per-layer choice
# 52 / 67 (68 / 56 s), im2col 92 / 125 (26 / 14 s). The real networks (width 64) have no such layer.
NARROW_CHANNELS = 64


def winograd_tile(out_side: int) -> int:
  """The Winograd tile (2 or 4) 'auto' uses on CPUs for a 3 x 3 stride-1 convolution, 0 for none."""
  for below, tile in WINOGRAD_TILES:
    if below is None or out_side < below:
      return tile
  return 0


def choose_conv(out_side: int, kernel_size: int, stride: int = 1, channels: Optional[int] = None) -> str:
  """What 'auto' runs on CPUs for a k x k convolution whose output is out_side x out_side: 'im2col' for
  layers of fewer than NARROW_CHANNELS `channels` (the wider of input and output; None: not narrow), for
  1 x 1 kernels and for outputs of at most IM2COL_MAX_SIDE per side, 'winograd' for the 3 x 3 stride-1
  convolutions that `winograd_tile` gives a tile, 'explicit' for the others."""
  if (out_side <= IM2COL_MAX_SIDE or kernel_size == 1
      or (channels is not None and channels < NARROW_CHANNELS)):
    return 'im2col'
  if kernel_size == 3 and stride == 1 and winograd_tile(out_side):
    return 'winograd'
  return 'explicit'


def winograd_conv(x, kernel, stride: int, padding: int):
  """conv_impl 'winograd': a 3 x 3, stride-1, padding-1 convolution as winograd.conv3x3 with the tile
  `winograd_tile` gives for its side (F(2 x 2) where it gives none), any other as conv.conv_explicit."""
  if kernel.shape[:2] == (3, 3) and stride == 1 and padding == 1:
    return winograd.conv3x3(x, kernel, winograd_tile(max(x.shape[1], x.shape[2])) or 2)
  return conv.conv_explicit(x, kernel, stride, padding)


def auto_conv(x, kernel, stride: int, padding: int):
  """conv_impl 'auto' on CPUs: the implementation `choose_conv` picks for these shapes."""
  k, _, c_in, c_out = kernel.shape
  out_side = conv.out_size(max(x.shape[1], x.shape[2]), k, stride, padding)
  impl = choose_conv(out_side, k, stride, max(c_in, c_out))
  return CONVS[impl](x, kernel, stride, padding)


CONVS = {'native': conv.xla_conv, 'im2col': conv.im2col_conv, 'explicit': conv.conv_explicit,
         'winograd': winograd_conv, 'auto': auto_conv}


def convolutions(conv_impl: str, backend: str) -> Tuple[Callable, Callable]:
  """(conv_fn, pool_fn) for `models.ResNet` (or `models.create_model`) from `config.model.conv_impl`.

  Args:
    conv_impl: one of CONV_IMPLS (module docstring).
    backend: the platform the model will run on, jax.default_backend() ('cpu', 'gpu', 'tpu'); 'auto'
      means the CPU choice only for 'cpu'.
  Returns:
    conv_fn(x, kernel, stride, padding) and pool_fn(x, window, stride, padding).
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
  if conv_impl == 'auto' and backend != 'cpu':
    conv_impl = 'native'
  pool_fn = conv.xla_max_pool if conv_impl == 'native' else conv.max_pool
  return CONVS[conv_impl], pool_fn
