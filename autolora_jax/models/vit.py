"""Vision Transformers (ViT-S/16, ViT-B/16) in timm's `vit_*_patch16_224` layout, with AutoLoRa's low-rank
branch on their dense layers, and the ConvStem variant of the robust ImageNet ViTs (Singh et al., 2023).

The model takes images in [0, 1], NHWC, and does inside itself what the ResNets do: a nearest-neighbour
resize to `input_size`, a clamp to [0, 1] and the input normalisation. Then:

* patch embedding: a 16x16 stride-16 convolution with bias (as one matmul over the 16 * 16 * 3 pixels of
  each patch), or for ``stem='convstem'`` four 3x3 stride-2 convolutions (48, 96, 192, 384 channels), each
  followed by a LayerNorm over the channels and GELU, and a 1x1 convolution to the embedding width;
* a class token in front and a learned position embedding added (`resample_pos_embed` fits a checkpoint's
  to another input size, as timm does);
* `depth` pre-norm blocks, x + attn(norm1(x)) and x + mlp(norm2(x)), with a fused qkv projection and an MLP
  of width 4 * dim with exact GELU; LayerNorm eps 1e-6;
* a final LayerNorm and the head on the class token.

Two branches share every weight, as for the ResNets:

* ``branch='adv'``: the feature extractor (FE) as it is, x W + b. This is the deployed model.
* ``branch='nat'``: every dense layer named in `lora_targets` adds its low-rank path, x (W + dW) + b with
  dW = (B @ A)^T * alpha / rank, A (rank, in) and B (out, rank) (`dense_lora_delta`); the fused qkv
  projection carries one (A, B) per q, k and v slice.

Parameter names mirror timm's state-dict keys: ``patch_embed/proj`` (``stem_0`` ... ``stem_12`` inside it
for the ConvStem, numbered as its nn.Sequential), ``cls_token``, ``pos_embed``, ``blocks_N/norm1``,
``blocks_N/attn/qkv`` (with ``q``, ``k``, ``v`` holding their ``lora_A``, ``lora_B``),
``blocks_N/attn/proj``, ``blocks_N/norm2``, ``blocks_N/mlp/fc1``, ``blocks_N/mlp/fc2``, ``norm``, ``head``.
There is no BatchNorm: the model has no 'batch_stats' variables.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autolora_jax.errors import ConfigError
from autolora_jax.models.archs import ArchSpec
from autolora_jax.models.attention import attend, attention_for
from autolora_jax.models.lora import ConvFn, native_conv2d
from autolora_jax.models.resnet import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  check_call,
  model_input,
  torch_linear_uniform,
)

PATCH_SIZE = 16
# (embedding width, blocks, heads) of timm's vit_small_patch16_224 and vit_base_patch16_224.
VIT_SIZES = {'vit_s16': (384, 12, 6), 'vit_b16': (768, 12, 12)}
# 'imagenet': timm's patch embedding; 'convstem': the convolutional stem of Singh et al.
VIT_STEMS = ('imagenet', 'convstem')
CONVSTEM_CHANNELS = (48, 96, 192, 384)
LORA_TARGETS = ('q', 'k', 'v', 'proj', 'fc1', 'fc2')  # the default: every dense layer of every block
LORA_INITS = ('normal', 'kaiming_uniform')
LAYER_NORM_EPS = 1e-6


def lora_a_init(name: str):
  """The init of a LoRa A of shape (rank, fan_in): 'normal' N(0, 1) (docs/method.md, the authors' conv branch) or
  'kaiming_uniform' U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform_(a=sqrt(5)), common in LoRA)."""
  if name == 'normal':
    return nn.initializers.normal(1.0)
  if name == 'kaiming_uniform':
    def init(key, shape, dtype=jnp.float32):
      bound = 1.0 / np.sqrt(shape[1])
      return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init
  raise ValueError(f'lora_init must be one of {LORA_INITS}, got {name!r}.')


def dense_lora_delta(lora_a, lora_b, scale):
  """dW of a dense kernel in Flax's (in, out) layout: (B @ A)^T * scale, A (rank, in), B (out, rank)."""
  return (lora_b @ lora_a).T * scale


def resample_pos_embed(pos_embed, grid: int):
  """A (1, 1 + g * g, dim) position embedding for a grid x grid patch grid: the class token's entry as it
  is, the g x g grid resized bicubically with antialiasing (timm's resample_abs_pos_embed defaults, equal
  to torch's F.interpolate(mode='bicubic', antialias=True) within 2e-6)."""
  pos_embed = np.asarray(pos_embed)
  g0 = int(round(np.sqrt(pos_embed.shape[1] - 1)))
  if g0 * g0 != pos_embed.shape[1] - 1:
    raise ValueError(f'pos_embed of shape {pos_embed.shape} has no square patch grid after its class token.')
  if g0 == grid:
    return pos_embed
  dim = pos_embed.shape[-1]
  patches = pos_embed[:, 1:].reshape(1, g0, g0, dim)
  resized = jax.image.resize(jnp.asarray(patches, jnp.float32), (1, grid, grid, dim), 'bicubic', antialias=True)
  out = np.concatenate([pos_embed[:, :1], np.asarray(resized).reshape(1, grid * grid, dim)], axis=1)
  return out.astype(pos_embed.dtype)


def fit_pretrained(path, value, shape):
  """A pre-trained leaf fitted to the model's `shape` where the model defines how: a ViT's position
  embedding (path ending in 'pos_embed', a tuple or '/'-joined) resampled to the model's patch grid; any
  other leaf as it is (a shape mismatch is the caller's error)."""
  name = path[-1] if isinstance(path, tuple) else str(path).rsplit('/', 1)[-1]
  if name == 'pos_embed' and np.ndim(value) == 3 and len(shape) == 3 and tuple(np.shape(value)) != tuple(shape):
    grid = int(round(np.sqrt(shape[1] - 1)))
    if grid * grid == shape[1] - 1 and np.shape(value)[2] == shape[2]:
      return resample_pos_embed(value, grid)
  return value


class LoRaDense(nn.Module):
  """A dense layer y = x W + b (W: (in, features)) whose output slices may carry a LoRa branch.

  Attributes:
    features: output width.
    slices: names of the equal output slices: ('q', 'k', 'v') for the fused qkv projection, one name for
      the others.
    lora: the slices that carry a low-rank path for branch 'nat' (a subset of `slices`).
    rank, alpha: dW = (B @ A)^T * alpha / rank; rank 0: no LoRa parameters.
    lora_init: the init of A (`lora_a_init`); B starts at zero, so 'nat' equals 'adv' at first.
    dtype: compute dtype of x W (parameters stay float32); the low-rank path and the output are float32.
  """
  features: int
  slices: Tuple[str, ...]
  lora: Tuple[str, ...] = ()
  rank: int = 0
  alpha: float = 1.0
  lora_init: str = 'normal'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, branch='adv'):
    d_in, d_slice = x.shape[-1], self.features // len(self.slices)
    kernel = self.param('kernel', nn.initializers.truncated_normal(0.02), (d_in, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=out_dtype) + bias
    if self.rank == 0 or not self.lora:
      return y
    # One slice: lora_A, lora_B beside the kernel (as LoRaConv's); several: under each slice's name.
    factors = {name: (_lora_factors(self, d_in, d_slice, self.rank, self.lora_init) if len(self.slices) == 1
                      else LoRaFactors(d_slice, self.rank, self.lora_init, name=name)(d_in))
               for name in self.lora}
    if branch != 'nat':
      return y
    x32, scale = x.astype(out_dtype), self.alpha / self.rank
    parts = [(x32 @ factors[name][0].T) @ factors[name][1].T * scale if name in factors
             else jnp.zeros(y.shape[:-1] + (d_slice,), out_dtype) for name in self.slices]
    return y + (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1))


def _lora_factors(module, d_in, d_out, rank, init):
  return (module.param('lora_A', lora_a_init(init), (rank, d_in)),
          module.param('lora_B', nn.initializers.zeros, (d_out, rank)))


class LoRaFactors(nn.Module):
  """The (A (rank, in), B (out, rank)) pair of one slice of a fused projection."""
  features: int
  rank: int
  lora_init: str = 'normal'

  @nn.compact
  def __call__(self, d_in):
    return _lora_factors(self, d_in, self.features, self.rank, self.lora_init)


def _layer_norm(name):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """timm's multi-head self-attention: fused qkv, softmax(q k^T / sqrt(head_dim)) v, output projection."""
  dim: int
  heads: int
  dense: Any  # (features, slices, name) -> LoRaDense
  impl: str = 'einsum'  # attention.IMPLEMENTATIONS
  dtype: Any = jnp.float32  # the compute dtype jax.nn.dot_product_attention takes its inputs in

  @nn.compact
  def __call__(self, x, branch):
    n, t, _ = x.shape
    hd = self.dim // self.heads
    qkv = self.dense(3 * self.dim, ('q', 'k', 'v'), 'qkv')(x, branch)
    # (3, N, heads, T, head_dim), as timm permutes it: batched matmuls over leading (N, heads) run 1.34x
    # faster forward and backward on XLA's CPU than contracting the (T, heads, head_dim) layout in place.
    q, k, v = qkv.reshape(n, t, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
    y = attend(q, k, v, impl=self.impl, dtype=self.dtype).transpose(0, 2, 1, 3).reshape(n, t, self.dim)
    return self.dense(self.dim, ('proj',), 'proj')(y, branch)


class Mlp(nn.Module):
  """timm's MLP: fc2(gelu(fc1(x))), exact GELU."""
  dim: int
  hidden: int
  dense: Any

  @nn.compact
  def __call__(self, x, branch):
    y = nn.gelu(self.dense(self.hidden, ('fc1',), 'fc1')(x, branch), approximate=False)
    return self.dense(self.dim, ('fc2',), 'fc2')(y, branch)


class Block(nn.Module):
  """timm's pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  dim: int
  heads: int
  mlp_dim: int
  dense: Any
  attention: str = 'einsum'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, branch):
    attn = Attention(self.dim, self.heads, self.dense, self.attention, self.dtype, name='attn')
    x = x + attn(_layer_norm('norm1')(x), branch)
    return x + Mlp(self.dim, self.mlp_dim, self.dense, name='mlp')(_layer_norm('norm2')(x), branch)


class StemConv(nn.Module):
  """A convolution with bias (torch.nn.Conv2d), NHWC x HWIO through `conv_fn`."""
  features: int
  kernel_size: int
  strides: int
  padding: int
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    y = self.conv_fn(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
    return y.astype(jnp.promote_types(self.dtype, jnp.float32)) + bias


class ConvStem(nn.Module):
  """Singh et al.'s ConvStem: [3x3/2 conv + bias, LayerNorm over channels, GELU] x 4, then a 1x1 conv to
  `dim`. Its parameters are stem_0, stem_1, stem_3, ..., stem_12: the indices of their nn.Sequential."""
  dim: int
  channels: Sequence[int] = CONVSTEM_CHANNELS
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, c in enumerate(self.channels):
      x = StemConv(c, 3, 2, 1, conv_fn=self.conv_fn, dtype=self.dtype, name=f'stem_{3 * i}')(x)
      x = nn.gelu(_layer_norm(f'stem_{3 * i + 1}')(x), approximate=False)
    return StemConv(self.dim, 1, 1, 0, conv_fn=self.conv_fn, dtype=self.dtype,
                    name=f'stem_{3 * len(self.channels)}')(x)


class PatchEmbed(nn.Module):
  """timm's PatchEmbed: tokens (N, (H / p) * (W / p), dim) in row-major patch order, from `proj`, a p x p
  stride-p convolution with bias (computed as one matmul) or the ConvStem."""
  dim: int
  patch_size: int = PATCH_SIZE
  stem: str = 'imagenet'
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.stem == 'convstem':
      y = ConvStem(self.dim, conv_fn=self.conv_fn, dtype=self.dtype, name='proj')(x)
      return y.reshape(x.shape[0], -1, self.dim)
    return _PatchProj(self.dim, self.patch_size, dtype=self.dtype, name='proj')(x)


class _PatchProj(nn.Module):
  """The p x p stride-p convolution of the patch embedding as a matmul: kernel (p, p, C, dim), bias."""
  dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.dim))
    bias = self.param('bias', nn.initializers.zeros, (self.dim,))
    patches = x[:, :gh * p, :gw * p].reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh * gw, p * p * c)
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    y = jnp.dot(patches.astype(self.dtype), kernel.reshape(p * p * c, self.dim).astype(self.dtype),
                preferred_element_type=out_dtype)
    return y + bias


class ViT(nn.Module):
  """A ViT in timm's layout with a LoRa branch; see the module docstring.

  Attributes:
    num_classes: outputs of the head on the class token.
    dim, depth, heads: embedding width, blocks, attention heads (VIT_SIZES); the MLP is mlp_ratio * dim.
    patch_size: side of a patch (16; the ConvStem downsamples by 16 too).
    lora_rank, lora_alpha: the LoRa branch's rank r (0: no LoRa parameters) and scale numerator.
    lora_targets: the dense layers that carry it, names from LORA_TARGETS (('q', 'v'): Hua et al.).
    lora_init: the init of the A factors (LORA_INITS).
    input_size: side the input is resized to inside the model (a multiple of patch_size).
    stem: 'imagenet' (timm's patch embedding) or 'convstem' (VIT_STEMS).
    mean, std: per-channel input normalisation; None for none.
    conv_fn: the ConvStem's convolutions (`lora.ConvFn`).
    dtype: compute dtype of the matmuls and convolutions (parameters stay float32); LayerNorms, softmax,
      the LoRa path, the head and the logits are float32.
    precision: matmul precision on GPUs and TPUs, one of PRECISIONS.
    attention: how the attention is computed, one of attention.IMPLEMENTATIONS (`attention_for` picks it
      from config.model.attention_impl and the backend); the same numbers within float round-off.
      `jax.nn.dot_product_attention` takes q, k, v in `dtype` (the einsums: float32).
    bn_axis_name, twin_bn: the ResNets' BatchNorm attributes, for a common interface; a ViT has no
      BatchNorm (twin_bn must stay False).
  """
  num_classes: int
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: int = 4
  patch_size: int = PATCH_SIZE
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
  bn_axis_name: Optional[str] = None
  twin_bn: bool = False

  def __call__(self, x, branch='adv', train=False, bn='adaptive'):
    """Logits (N, num_classes) for images x (N, H, W, C) in [0, 1]; `train` changes nothing (no dropout,
    no BatchNorm), `bn` must be 'adaptive'."""
    del train
    check_call(branch, self.precision, 'ViT', bn, self.twin_bn)
    check_vit(self.stem, self.input_size, self.patch_size, self.lora_targets, self.lora_init, self.dim,
              self.heads)
    with jax.default_matmul_precision(self.precision):
      return self._forward(x, branch)

  @nn.compact
  def _forward(self, x, branch):
    x = model_input(x, self.input_size, self.mean, self.std)
    tokens = PatchEmbed(self.dim, self.patch_size, self.stem, conv_fn=self.conv_fn, dtype=self.dtype,
                        name='patch_embed')(x)
    n, t, _ = tokens.shape
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.dim))
    pos = self.param('pos_embed', nn.initializers.truncated_normal(0.02), (1, t + 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.dim)).astype(tokens.dtype), tokens], axis=1) + pos

    targets = tuple(self.lora_targets)

    def dense(features, slices, name):
      return LoRaDense(features, slices, lora=tuple(s for s in slices if s in targets), rank=self.lora_rank,
                       alpha=self.lora_alpha, lora_init=self.lora_init, dtype=self.dtype, name=name)

    for i in range(self.depth):
      x = Block(self.dim, self.heads, self.mlp_ratio * self.dim, dense, self.attention, self.dtype,
                name=f'blocks_{i}')(x, branch)
    x = _layer_norm('norm')(x)[:, 0]
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    return nn.Dense(self.num_classes, dtype=head_dtype, kernel_init=torch_linear_uniform(self.dim),
                    bias_init=torch_linear_uniform(self.dim), name='head')(x.astype(head_dtype))


def check_vit(stem, input_size, patch_size, lora_targets, lora_init, dim, heads) -> None:
  """ValueError with the fix for a ViT setting it cannot build."""
  if stem not in VIT_STEMS:
    raise ValueError(f'A ViT takes stem {VIT_STEMS[0]!r} (the 16x16 patch embedding) or {VIT_STEMS[1]!r} (the '
                     f'convolutional stem), got {stem!r}.')
  if input_size % patch_size:
    raise ValueError(f'A ViT/{patch_size} needs an input size that is a multiple of {patch_size}, got '
                     f'{input_size} (224 is the checkpoints\' own).')
  unknown = [t for t in lora_targets if t not in LORA_TARGETS]
  if unknown or isinstance(lora_targets, str):
    raise ValueError(f'Unknown LoRa target(s) {unknown or lora_targets!r}: lora_targets takes names from '
                     f"{LORA_TARGETS}, e.g. ('q', 'v') for the query and value projections only.")
  if lora_init not in LORA_INITS:
    raise ValueError(f'lora_init must be one of {LORA_INITS}, got {lora_init!r}.')
  if dim % heads:
    raise ValueError(f'The embedding width {dim} is not a multiple of the {heads} heads.')


def vit(arch: str, num_classes: int, **kwargs) -> ViT:
  """ViT-S/16 ('vit_s16') or ViT-B/16 ('vit_b16'); `kwargs` are `ViT` attributes (dim, depth, heads too)."""
  dim, depth, heads = VIT_SIZES[arch]
  kwargs = {'dim': dim, 'depth': depth, 'heads': heads, **kwargs}
  return ViT(num_classes=num_classes, **kwargs)


vit_s16 = functools.partial(vit, 'vit_s16')
vit_b16 = functools.partial(vit, 'vit_b16')
VITS = {'vit_s16': vit_s16, 'vit_b16': vit_b16}


def vit_size(model_config) -> dict:
  """`config.model.vit`'s dim, depth and heads that are set (0: the architecture's own, VIT_SIZES)."""
  sizes = model_config.get('vit') or {}
  return {k: int(sizes[k]) for k in ('dim', 'depth', 'heads') if sizes.get(k)}


def _attributes(model_config) -> dict:
  return {'lora_targets': tuple(model_config.get('lora_targets', LORA_TARGETS)),
          'lora_init': model_config.get('lora_init', 'normal'),
          'attention': attention_for(model_config.get('attention_impl', 'auto'), jax.default_backend()),
          **vit_size(model_config)}


def check_config(model_config) -> None:
  """ConfigError with the fix for a ViT `config.model` it cannot build: the stem, an input size that is not
  a multiple of the patches, unknown LoRa targets or init, config.model.vit, a ResNet lora_placement."""
  m = model_config
  if m.stem not in VIT_STEMS:
    raise ConfigError(f'config.model.stem={m.stem!r} is a ResNet stem; config.model.arch={m.arch} takes '
                      f"'imagenet' (the 16x16 patch embedding) or 'convstem' (the convolutional stem of the robust "
                      f'ImageNet ViTs), e.g. --config.model.stem=imagenet.')
  if m.input_size % PATCH_SIZE:
    up = -(-m.input_size // PATCH_SIZE) * PATCH_SIZE
    raise ConfigError(f'config.model.input_size={m.input_size} is not a multiple of the ViT\'s 16x16 patches: '
                      f'use e.g. --config.model.input_size={up} (224 is the ImageNet checkpoints\' own; other '
                      'sizes resample their position embedding).')
  targets = m.get('lora_targets', LORA_TARGETS)
  if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
    raise ConfigError(f'config.model.lora_targets={targets!r} has an unknown LoRa target: choose a non-empty '
                      f'list from {LORA_TARGETS} (q, k, v: slices of the fused qkv projection; proj: the '
                      "attention output; fc1, fc2: the MLP), e.g. --config.model.lora_targets=\"('q','v')\".")
  init = m.get('lora_init', 'normal')
  if init not in LORA_INITS:
    raise ConfigError(f'config.model.lora_init={init!r} is not supported: choose one of {LORA_INITS} '
                      f'(e.g. --config.model.lora_init={LORA_INITS[0]}).')
  sizes = m.get('vit') or {}
  for key in ('dim', 'depth', 'heads'):
    v = sizes.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f'config.model.vit.{key} must be an integer >= 0 (0: the architecture\'s own), got {v!r}.')
  dim, _, heads = VIT_SIZES[m.arch]
  dim, heads = sizes.get('dim') or dim, sizes.get('heads') or heads
  if dim % heads:
    raise ConfigError(f'The ViT\'s width {dim} (config.model.vit.dim) is not a multiple of its {heads} heads '
                      '(config.model.vit.heads).')
  if m.lora_placement != 'all':
    raise ConfigError(f"config.model.lora_placement={m.lora_placement!r} places LoRa in ResNet blocks; a ViT "
                      'places it by config.model.lora_targets: leave lora_placement at \'all\'.')


SPECS = tuple(
    ArchSpec(name=name, label='ViT', builder=builder, attributes=_attributes, has_batchnorm=False,
             stems=VIT_STEMS, lora_placements=('all',), lora_targets=LORA_TARGETS,
             ignores=('width', 'pool_fn', 'lora_placement'), reference_code=False,
             converter='autolora_jax.convert.vit', pretrained=f'{name}_linf_eps4.0', check_config=check_config)
    for name, builder in VITS.items())
