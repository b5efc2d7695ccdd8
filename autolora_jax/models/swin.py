"""Swin-T/S/B/L in timm's `swin_*_patch4_window7_224` layout, with AutoLoRa's low-rank branch on the dense
layers of every block (qkv as its q, k, v slices, proj, fc1, fc2).

The model takes images in [0, 1], NHWC, and resizes (nearest), clamps and normalises them inside, as the
ViT does. Then:

* patch embedding: a 4x4 stride-4 convolution with bias and a LayerNorm;
* four stages of tokens on an (H, W) grid, channels last; stages 1-3 open with patch merging (the 2x2
  neighbours concatenated in timm's order (0, 0), (1, 0), (0, 1), (1, 1) by (row, column), a LayerNorm over
  the 4 C values and a bias-free linear reduction to 2 C);
* pre-norm blocks x + attn(norm1(x)), x + mlp(norm2(x)); the attention is windowed (window x window tokens)
  with a learned relative position bias, and every second block shifts the grid by window // 2 first,
  masking (-100) the pairs that the cyclic shift brought together; as in timm, a stage whose grid is not
  larger than the window attends over the whole grid (the window clamped to the grid, no shift), with the
  bias table's central entries;
* a final LayerNorm, the mean over the tokens and the head. LayerNorm eps 1e-5 (nn.LayerNorm's), exact GELU.

Two branches share every weight, as for the ViT (`vit.LoRaDense`); ``branch='adv'`` is the deployed model.

Parameter names mirror timm's keys: ``patch_embed/proj``, ``patch_embed/norm``, ``layers_I/downsample/norm``,
``layers_I/downsample/reduction``, ``layers_I/blocks_J/norm1``, ``.../attn/qkv`` (``q``, ``k``, ``v`` holding
their LoRa factors), ``.../attn/proj``, ``.../attn/relative_position_bias_table``, ``.../norm2``,
``.../mlp/fc1``, ``.../mlp/fc2``, ``norm`` and ``head`` (timm's head.fc). No BatchNorm.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autolora_jax.errors import ConfigError
from autolora_jax.models import stochastic_depth
from autolora_jax.models.archs import ArchSpec
from autolora_jax.models.attention import attend, attention_for
from autolora_jax.models.convnext import PatchConv
from autolora_jax.models.lora import ConvFn, native_conv2d
from autolora_jax.models.resnet import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  check_call,
  model_input,
  torch_linear_uniform,
)
from autolora_jax.models.vit import LORA_INITS, LORA_TARGETS, LoRaDense, Mlp

# (depths, embedding width, heads of the first stage; both doubled per stage) of timm's swin_*_patch4_window7_224.
SWIN_SIZES = {
    'swin_t': ((2, 2, 6, 2), 96, 3),
    'swin_s': ((2, 2, 18, 2), 96, 3),
    'swin_b': ((2, 2, 18, 2), 128, 4),
    'swin_l': ((2, 2, 18, 2), 192, 6),
}
WINDOW = 7
PATCH_SIZE = 4
MASK_VALUE = -100.0
LAYER_NORM_EPS = 1e-5


def _layer_norm(name):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=jnp.float32, name=name)


def stage_windows(input_size: int, window: int, stages: int = 4):
  """((grid, window, shift) of each stage) at `input_size`: timm's clamp, a grid not larger than the window
  is one window without shift; None when some stage's grid is odd before merging or not a multiple of its
  window (sizes timm pads to; this model refuses them)."""
  if input_size % PATCH_SIZE:
    return None
  grid, out = input_size // PATCH_SIZE, []
  for i in range(stages):
    if i > 0:
      if grid % 2:
        return None
      grid //= 2
    w = min(grid, window)
    if grid % w:
      return None
    out.append((grid, w, 0 if grid <= window else window // 2))
  return tuple(out)


def working_sizes(window: int, up_to: int = 512) -> Tuple[int, ...]:
  """The input sizes up to `up_to` that `stage_windows` takes for `window`."""
  return tuple(s for s in range(PATCH_SIZE, up_to + 1, PATCH_SIZE) if stage_windows(s, window) is not None)


def relative_position_index(window: int, table_window: int) -> np.ndarray:
  """(window^2, window^2) indices into a ((2 t - 1)^2, heads) bias table, t = table_window >= window: timm's
  get_relative_position_index for t = window; a clamped window uses the table's central entries."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)
  return (rel[0] * (2 * table_window - 1) + rel[1]).astype(np.int32)


def shift_mask(grid: int, window: int, shift: int) -> np.ndarray:
  """(windows, window^2, window^2) additive attention mask of the shifted windows: MASK_VALUE between tokens
  of different regions of the cyclically shifted grid, 0 elsewhere (timm's attn_mask)."""
  regions = np.zeros((grid, grid), np.float32)
  cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for k, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
    regions[h, w] = k
  ids = partition(regions[None, :, :, None], window).reshape(-1, window * window)
  return np.where(ids[:, None, :] != ids[:, :, None], MASK_VALUE, 0.0).astype(np.float32)


def partition(x, window: int):
  """(N, H, W, C) -> (N * H / w * W / w, w, w, C), windows in row-major order (timm's window_partition)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c)


def unpartition(windows, window: int, h: int, w: int):
  """The inverse of `partition` (timm's window_reverse)."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
  """timm's WindowAttention: fused qkv, softmax(q k^T / sqrt(head_dim) + bias [+ mask]) v, proj."""
  dim: int
  heads: int
  window: int  # the window attended over (clamped)
  table_window: int  # the bias table's window (the architecture's)
  dense: Any  # (features, slices, name) -> LoRaDense
  impl: str = 'einsum'  # attention.IMPLEMENTATIONS
  dtype: Any = jnp.float32  # the compute dtype jax.nn.dot_product_attention takes its inputs in

  @nn.compact
  def __call__(self, x, branch, mask=None):
    b, t, _ = x.shape
    hd = self.dim // self.heads
    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * self.table_window - 1) ** 2, self.heads))
    index = relative_position_index(self.window, self.table_window)
    bias = table[index.reshape(-1)].reshape(t, t, self.heads).transpose(2, 0, 1)
    qkv = self.dense(3 * self.dim, ('q', 'k', 'v'), 'qkv')(x, branch)
    q, k, v = qkv.reshape(b, t, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
    if mask is not None:  # window i of every image (b = images x windows, windows inner) gets mask[i]
      bias = bias[None] + mask[:, None]
    y = attend(q, k, v, bias, impl=self.impl, dtype=self.dtype).transpose(0, 2, 1, 3).reshape(b, t, self.dim)
    return self.dense(self.dim, ('proj',), 'proj')(y, branch)


class SwinBlock(nn.Module):
  """timm's SwinTransformerBlock on (N, H, W, C): shifted-window attention and the MLP, pre-norm."""
  dim: int
  heads: int
  window: int
  shift: int
  table_window: int
  dense: Any
  attention: str = 'einsum'
  dtype: Any = jnp.float32
  rate: float = 0.0  # the drop-path rate of both residual branches (`stochastic_depth.drop_branch`)
  site: int = 0  # the attention branch's number in the model; the MLP's is site + 1

  @nn.compact
  def __call__(self, x, branch, drop_keys=None):
    n, h, w, c = x.shape
    y = _layer_norm('norm1')(x)
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
    windows = partition(y, self.window).reshape(-1, self.window * self.window, c)
    mask = jnp.asarray(shift_mask(h, self.window, self.shift)) if self.shift else None
    windows = WindowAttention(self.dim, self.heads, self.window, self.table_window, self.dense, self.attention,
                              self.dtype, name='attn')(windows, branch, mask)
    y = unpartition(windows.reshape(-1, self.window, self.window, c), self.window, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + stochastic_depth.drop_branch(y, drop_keys, self.rate, self.site)
    y = Mlp(self.dim, 4 * self.dim, self.dense, name='mlp')(_layer_norm('norm2')(x), branch)
    return x + stochastic_depth.drop_branch(y, drop_keys, self.rate, self.site + 1)


class PatchMerging(nn.Module):
  """timm's PatchMerging: each 2x2 neighbourhood's C values concatenated in the order (0, 0), (1, 0),
  (0, 1), (1, 1) (row, column), LayerNorm over the 4 C, a bias-free linear layer to `features`."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(n, h // 2, w // 2, 4 * c)
    x = _layer_norm('norm')(x)
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype, name='reduction')(x).astype(out_dtype)


class SwinStage(nn.Module):
  """timm's SwinTransformerStage: patch merging (stages 1-3), then `depth` blocks, shifting every second."""
  dim: int
  depth: int
  heads: int
  window: int
  shift: int
  table_window: int
  downsample: bool
  dense: Any
  dtype: Any = jnp.float32
  attention: str = 'einsum'
  rates: Sequence[float] = ()  # the blocks' drop-path rates (stochastic_depth.block_rates; () for none)
  first_site: int = 0  # the first block's attention branch number in the model (two per block)

  @nn.compact
  def __call__(self, x, branch, drop_keys=None):
    if self.downsample:
      x = PatchMerging(self.dim, dtype=self.dtype, name='downsample')(x)
    rates = tuple(self.rates) or (0.0,) * self.depth
    for j in range(self.depth):
      x = SwinBlock(self.dim, self.heads, self.window, self.shift if j % 2 else 0, self.table_window, self.dense,
                    self.attention, self.dtype, rates[j], self.first_site + 2 * j, name=f'blocks_{j}')(
                        x, branch, drop_keys)
    return x


class _PatchEmbed(nn.Module):
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _layer_norm('norm')(PatchConv(self.dim, PATCH_SIZE, dtype=self.dtype, name='proj')(x))


class Swin(nn.Module):
  """A Swin Transformer in timm's layout with a LoRa branch; see the module docstring.

  Attributes:
    num_classes: outputs of the head.
    depths, dim, heads: blocks per stage, the first stage's width and heads (both doubled per stage).
    window: the attention window (7; the relative position bias table is (2 window - 1)^2 x heads).
    lora_rank, lora_alpha, lora_targets, lora_init: as models.ViT's (vit.LORA_TARGETS).
    input_size: side the input is resized to inside the model (`working_sizes(window)`, e.g. 224).
    stem: 'imagenet' only (the 4x4 patch embedding).
    mean, std: per-channel input normalisation; None for none.
    conv_fn: unused (the patch embedding is a matmul); for a common interface.
    dtype, precision, attention: as models.ViT's.
    drop_path: the stochastic depth rate of the last block, in [0, 1) (`models.stochastic_depth`; the blocks'
      rates rise linearly from 0); used in training mode only, with `drop_keys`. Fine-tuning runs without it
      by default (0.0).
    bn_axis_name, twin_bn: the ResNets' BatchNorm attributes, for a common interface (no BatchNorm here).
  """
  num_classes: int
  depths: Sequence[int] = (2, 2, 6, 2)
  dim: int = 96
  heads: int = 3
  window: int = WINDOW
  lora_rank: int = 8
  lora_alpha: float = 1.0
  lora_targets: Sequence[str] = LORA_TARGETS
  lora_init: str = 'normal'
  input_size: int = 224
  stem: str = 'imagenet'
  mean: Optional[Sequence[float]] = IMAGENET_MEAN
  std: Optional[Sequence[float]] = IMAGENET_STD
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32
  precision: str = 'default'
  attention: str = 'einsum'
  drop_path: float = 0.0
  bn_axis_name: Optional[str] = None
  twin_bn: bool = False

  def __call__(self, x, branch='adv', train=False, bn='adaptive', drop_keys=None):
    """Logits (N, num_classes) for images x (N, H, W, C) in [0, 1]. `train` with drop_path > 0 drops the
    blocks' residual branches per example, drawn from drop_keys, one key per image (`models.stochastic_depth`);
    otherwise it changes nothing."""
    check_call(branch, self.precision, 'Swin', bn, self.twin_bn)
    check_swin(self.stem, self.input_size, self.window, self.lora_targets, self.drop_path)
    stochastic_depth.check_call(self.drop_path, train, drop_keys, x.shape[0], 'Swin')
    with jax.default_matmul_precision(self.precision):
      return self._forward(x, branch, drop_keys if train and self.drop_path else None)

  @nn.compact
  def _forward(self, x, branch, drop_keys):
    x = model_input(x, self.input_size, self.mean, self.std)
    targets = tuple(self.lora_targets)

    def dense(features, slices, name):
      return LoRaDense(features, slices, lora=tuple(s for s in slices if s in targets), rank=self.lora_rank,
                       alpha=self.lora_alpha, lora_init=self.lora_init, dtype=self.dtype, name=name)

    x = _PatchEmbed(self.dim, dtype=self.dtype, name='patch_embed')(x)
    stages = stage_windows(self.input_size, self.window, len(self.depths))
    rates = stochastic_depth.block_rates(self.drop_path, self.depths)
    for i, (depth, (_, window, shift)) in enumerate(zip(self.depths, stages)):
      x = SwinStage(self.dim * 2 ** i, depth, self.heads * 2 ** i, window, shift, self.window, i > 0, dense,
                    dtype=self.dtype, attention=self.attention, rates=rates[i], first_site=2 * sum(self.depths[:i]),
                    name=f'layers_{i}')(x, branch, drop_keys)
    x = jnp.mean(_layer_norm('norm')(x), axis=(1, 2))
    width = self.dim * 2 ** (len(self.depths) - 1)
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    return nn.Dense(self.num_classes, dtype=head_dtype, kernel_init=torch_linear_uniform(width),
                    bias_init=torch_linear_uniform(width), name='head')(x.astype(head_dtype))


def _size_error(input_size: int, window: int) -> str:
  sizes = working_sizes(window)
  return (f'A Swin with window {window} takes input sizes whose every stage grid (size / 4, then halved) is '
          f'even before merging and a multiple of the window or not larger than it; {input_size} is not one. '
          f'Sizes that work up to 512: {", ".join(map(str, sizes)) or "none"}'
          + ('' if window == 4 else ' (config.model.swin.window=4 also takes 32, 64, 128, ...)') + '.')


def check_swin(stem, input_size, window, lora_targets, drop_path) -> None:
  """ValueError with the fix for a Swin setting it cannot build."""
  if stem != 'imagenet':
    raise ValueError(f"A Swin takes stem 'imagenet' (the 4x4 patch embedding), got {stem!r}.")
  if stage_windows(input_size, window) is None:
    raise ValueError(_size_error(input_size, window))
  unknown = [t for t in lora_targets if t not in LORA_TARGETS]
  if unknown or isinstance(lora_targets, str):
    raise ValueError(f'Unknown LoRa target(s) {unknown or lora_targets!r}: lora_targets takes names from '
                     f'{LORA_TARGETS}.')
  stochastic_depth.check_rate(drop_path)


def swin(arch: str, num_classes: int, **kwargs) -> Swin:
  """Swin-T/S/B/L ('swin_t', ...); `kwargs` are `Swin` attributes (depths, dim, heads, window too)."""
  depths, dim, heads = SWIN_SIZES[arch]
  kwargs = {'depths': depths, 'dim': dim, 'heads': heads, **kwargs}
  return Swin(num_classes=num_classes, **kwargs)


SWINS = {name: functools.partial(swin, name) for name in SWIN_SIZES}


def swin_size(model_config) -> dict:
  """`config.model.swin`'s sizes that are set (dim, heads, depths; 0 and (): the architecture's own) and its
  window."""
  sizes = model_config.get('swin') or {}
  out = {k: int(sizes[k]) for k in ('dim', 'heads') if sizes.get(k)}
  if sizes.get('depths'):
    out['depths'] = tuple(int(d) for d in sizes['depths'])
  out['window'] = int(sizes.get('window', WINDOW) or WINDOW)
  return out


def _attributes(model_config) -> dict:
  return {'lora_targets': tuple(model_config.get('lora_targets', LORA_TARGETS)),
          'lora_init': model_config.get('lora_init', 'normal'), 'drop_path': float(model_config.get('drop_path', 0.0)),
          'attention': attention_for(model_config.get('attention_impl', 'auto'), jax.default_backend()),
          **swin_size(model_config)}


def check_config(model_config) -> None:
  """ConfigError with the fix for a Swin `config.model` it cannot build."""
  m = model_config
  if m.stem != 'imagenet':
    raise ConfigError(f"config.model.stem={m.stem!r}: a Swin has one stem, 'imagenet' (the 4x4 patch embedding): "
                      'set --config.model.stem=imagenet.')
  sizes = m.get('swin') or {}
  for key in ('dim', 'heads', 'window'):
    v = sizes.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f'config.model.swin.{key} must be an integer >= 0 (0: the architecture\'s own), got {v!r}.')
  depths = tuple(sizes.get('depths', ()) or ())
  if depths and (len(depths) != 4 or any(not isinstance(d, int) or d < 1 for d in depths)):
    raise ConfigError(f'config.model.swin.depths must be () (the architecture\'s own) or four positive integers, '
                      f'got {depths!r}.')
  window = sizes.get('window') or WINDOW
  if stage_windows(m.input_size, window) is None:
    raise ConfigError(f'config.model.input_size={m.input_size}: ' + _size_error(m.input_size, window)
                      + ' Set --config.model.input_size accordingly.')
  targets = m.get('lora_targets', LORA_TARGETS)
  if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
    raise ConfigError(f'config.model.lora_targets={targets!r} has an unknown LoRa target: choose a non-empty list '
                      f'from {LORA_TARGETS} (q, k, v: slices of the fused qkv projection; proj: the attention '
                      "output; fc1, fc2: the MLP), e.g. --config.model.lora_targets=\"('q','v')\".")
  init = m.get('lora_init', 'normal')
  if init not in LORA_INITS:
    raise ConfigError(f'config.model.lora_init={init!r} is not supported: choose one of {LORA_INITS}.')
  _, dim, heads = SWIN_SIZES[m.arch]
  dim, heads = sizes.get('dim') or dim, sizes.get('heads') or heads
  if dim % heads:
    raise ConfigError(f'The Swin\'s width {dim} (config.model.swin.dim) is not a multiple of its {heads} heads '
                      '(config.model.swin.heads).')
  if m.lora_placement != 'all':
    raise ConfigError(f"config.model.lora_placement={m.lora_placement!r} places LoRa in ResNet blocks; a Swin "
                      "places it by config.model.lora_targets: leave lora_placement at 'all'.")


SPECS = tuple(
    ArchSpec(name=name, label='Swin', builder=builder, attributes=_attributes, has_batchnorm=False,
             stems=('imagenet',), lora_placements=('all',), lora_targets=LORA_TARGETS,
             ignores=('width', 'pool_fn', 'lora_placement'), reference_code=False,
             converter='autolora_jax.convert.swin', pretrained=f'{name}_linf_eps4.0', drop_path=True,
             check_config=check_config)
    for name, builder in SWINS.items())
