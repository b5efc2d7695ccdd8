"""ConvNeXt-T/S/B/L in timm's `convnext_*` layout, with AutoLoRa's low-rank branch on the pointwise MLP of
every block (and optionally on the downsampling convolutions), and the ConvStem variants of the robust
ImageNet ConvNeXts (Singh, Croce and Hein, 2023).

The model takes images in [0, 1], NHWC, and resizes (nearest), clamps and normalises them inside, as the
ViT does. Then:

* stem: a 4x4 stride-4 convolution with bias and a LayerNorm over the channels; or for ``stem='convstem'``
  Singh et al.'s stack of 3x3 convolutions with bias, each followed by a channel LayerNorm and GELU: for
  T and S two stride-2 ones (dim / 2, dim channels), for B and L stride 2, 2 and 1 (dim / 2, 3 dim / 4, dim);
* four stages; stages 1-3 open with a downsampling layer (LayerNorm, 2x2 stride-2 convolution with bias);
  each block is x + gamma * fc2(gelu(fc1(norm(dwconv7x7(x))))), channels last, gamma the layer scale;
* global average pool, LayerNorm, the head. Every LayerNorm has eps 1e-6, GELU is exact.

Two branches share every weight (as models/vit.py): ``branch='adv'`` is the feature extractor as it is
(the deployed model); ``branch='nat'`` adds the low-rank path x dW (`vit.LoRaDense`) to every layer named in
`lora_targets`: 'fc1', 'fc2' (the MLP's dense layers) and 'downsample' (the 2x2 convolutions, as dense
layers over their 2 * 2 * C patch).

Parameter names mirror timm's keys: ``stem_0``, ``stem_1`` (or ``stem/stem_0`` ... for the ConvStem,
numbered as its nn.Sequential), ``stages_I/downsample_0`` (LayerNorm), ``stages_I/downsample_1`` (conv),
``stages_I/blocks_J/conv_dw``, ``.../norm``, ``.../mlp/fc1``, ``.../mlp/fc2``, ``.../gamma``, and
``head_norm`` (timm's head.norm, outside 'head' so that it is a part of the FE) and ``head`` (head.fc).
There is no BatchNorm.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from autolora_jax.errors import ConfigError
from autolora_jax.models import stochastic_depth
from autolora_jax.models.archs import ArchSpec
from autolora_jax.models.lora import ConvFn, native_conv2d
from autolora_jax.models.resnet import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  check_call,
  model_input,
  torch_linear_uniform,
)
from autolora_jax.models.vit import LoRaDense, StemConv, lora_a_init

# (depths, dims, ConvStem layout) of timm's convnext_tiny/small/base/large; the ConvStem layout: 'two' (3x3/2
# convolutions to dim / 2 and dim) or 'three' (to dim / 2, 3 dim / 4 and dim, strides 2, 2, 1), as Singh et
# al. build it for each size.
CONVNEXT_SIZES = {
    'convnext_t': ((3, 3, 9, 3), (96, 192, 384, 768), 'two'),
    'convnext_s': ((3, 3, 27, 3), (96, 192, 384, 768), 'two'),
    'convnext_b': ((3, 3, 27, 3), (128, 256, 512, 1024), 'three'),
    'convnext_l': ((3, 3, 27, 3), (192, 384, 768, 1536), 'three'),
}
CONVNEXT_STEMS = ('imagenet', 'convstem')
CONVNEXT_LORA_TARGETS = ('fc1', 'fc2', 'downsample')
DEFAULT_LORA_TARGETS = ('fc1', 'fc2')  # what config.model.lora_targets' default (every ViT dense layer) means here
VIT_DEFAULT_TARGETS = ('q', 'k', 'v', 'proj', 'fc1', 'fc2')
STRIDE = 32  # the total downsampling: the input size must be a multiple of it
LAYER_NORM_EPS = 1e-6


def _layer_norm(name):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=jnp.float32, name=name)


def convstem_layers(layout: str, dim: int) -> Tuple[Tuple[int, int], ...]:
  """(channels, stride) of each 3x3 convolution of Singh et al.'s ConvStem that ends at `dim` channels."""
  if layout == 'two':
    return ((dim // 2, 2), (dim, 2))
  return ((dim // 2, 2), (3 * dim // 4, 2), (dim, 1))


class PatchConv(nn.Module):
  """A p x p stride-p convolution with bias (kernel HWIO (p, p, C, features)), computed as one matmul over
  the p * p * C values of each patch, with an optional LoRa branch on that matmul for branch 'nat':
  patches (A^T B^T) * alpha / rank, A (rank, p * p * C), B (features, rank)."""
  features: int
  patch: int
  lora: bool = False
  rank: int = 0
  alpha: float = 1.0
  lora_init: str = 'normal'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, branch='adv'):
    n, h, w, c = x.shape
    p = self.patch
    gh, gw = h // p, w // p
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    patches = x[:, :gh * p, :gw * p].reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh, gw, p * p * c)
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    y = jnp.dot(patches.astype(self.dtype), kernel.reshape(p * p * c, self.features).astype(self.dtype),
                preferred_element_type=out_dtype) + bias
    if not self.lora or self.rank == 0:
      return y
    lora_a = self.param('lora_A', lora_a_init(self.lora_init), (self.rank, p * p * c))
    lora_b = self.param('lora_B', nn.initializers.zeros, (self.features, self.rank))
    if branch != 'nat':
      return y
    return y + (patches.astype(out_dtype) @ lora_a.T) @ lora_b.T * (self.alpha / self.rank)


def _padded_rows(x, k):
  """NHWC x zero-padded by k // 2 on both sides of H and W, and rows(i): the padded rows i to i + H - 1
  (N, H, W + k - 1, C), which hold every input a kernel row i reaches."""
  p, h = k // 2, x.shape[1]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return lambda i: lax.dynamic_slice_in_dim(xp, i, h, axis=1)


def _shift_sum(x, taps):
  """sum over (i, j) of the padded x shifted by (i, j) times taps[i, j]: a stride-1 'same' depthwise
  correlation of NHWC x with taps (k, k, C), one loop XLA fuses."""
  k, w = taps.shape[0], x.shape[2]
  rows_at = _padded_rows(x, k)

  def add_row(i, y):  # one kernel row per iteration: a small loop body to compile
    rows, row_taps = rows_at(i), taps[i]
    for j in range(k):
      y = y + rows[:, :, j:j + w] * row_taps[j]
    return y

  return lax.fori_loop(0, k, add_row, jnp.zeros_like(x))


@jax.custom_vjp
def shifted_depthwise(x, kernel):
  """A stride-1 'same' depthwise convolution of NHWC x with kernel (k, k, 1, C), as k * k shifted
  multiply-adds of the padded input (one kernel row per loop iteration, which XLA fuses); the input gradient
  is the same sum with the flipped kernel, the kernel gradient one reduction per kernel row. On CPUs XLA's
  grouped convolution and its gradients are far slower: with this one the ConvNeXt-T train step runs 2.25
  times as fast (docs/convnext_swin.md)."""
  return _shift_sum(x, kernel[:, :, 0])


def _shifted_fwd(x, kernel):
  return _shift_sum(x, kernel[:, :, 0]), (x, kernel)


def _shifted_bwd(res, g):
  x, kernel = res
  k, w = kernel.shape[0], x.shape[2]
  g = g.astype(x.dtype)
  dx = _shift_sum(g, kernel[::-1, ::-1, 0])
  rows_at = _padded_rows(x, k)

  def row(i):  # dk[i, j] = sum over n, h, w of padded x[n, h + i, w + j] * g[n, h, w]
    rows = rows_at(i)
    return jnp.stack([jnp.sum(rows[:, :, j:j + w] * g, axis=(0, 1, 2)) for j in range(k)])

  dk = lax.map(row, jnp.arange(k))
  return dx, dk[:, :, None, :].astype(kernel.dtype)


shifted_depthwise.defvjp(_shifted_fwd, _shifted_bwd)


def grouped_depthwise(x, kernel):
  """The same convolution as XLA's grouped convolution (feature_group_count = C)."""
  k, c = kernel.shape[0], x.shape[-1]
  return lax.conv_general_dilated(x, kernel, (1, 1), ((k // 2, k // 2), (k // 2, k // 2)), feature_group_count=c,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


DEPTHWISE = {'grouped': grouped_depthwise, 'shifts': shifted_depthwise}


def depthwise_for(conv_impl: str, backend: str) -> str:
  """The depthwise implementation for `config.model.conv_impl` on `backend`: 'shifts' on CPUs (every
  conv_impl but 'native'), XLA's 'grouped' convolution elsewhere."""
  return 'shifts' if backend == 'cpu' and conv_impl != 'native' else 'grouped'


class DepthwiseConv(nn.Module):
  """timm's conv_dw: a k x k depthwise convolution with bias, 'same' padding (kernel (k, k, 1, C)),
  computed by DEPTHWISE[impl]."""
  kernel_size: int = 7
  dtype: Any = jnp.float32
  impl: str = 'grouped'

  @nn.compact
  def __call__(self, x):
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, 1, c))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    y = DEPTHWISE[self.impl](x.astype(self.dtype), kernel.astype(self.dtype))
    return y.astype(jnp.promote_types(self.dtype, jnp.float32)) + bias


class Mlp(nn.Module):
  """timm's Mlp of a ConvNeXt block, channels last: fc2(gelu(fc1(x))), exact GELU."""
  dim: int
  hidden: int
  dense: Any  # (features, name) -> LoRaDense

  @nn.compact
  def __call__(self, x, branch):
    y = nn.gelu(self.dense(self.hidden, 'fc1')(x, branch), approximate=False)
    return self.dense(self.dim, 'fc2')(y, branch)


class ConvNeXtBlock(nn.Module):
  """x + gamma * mlp(norm(conv_dw(x))), NHWC; gamma the layer scale (timm's init 1e-6); with drop_keys the
  residual branch is dropped per example at `rate` (`stochastic_depth.drop_branch`, branch number `site`)."""
  dim: int
  dense: Any
  dtype: Any = jnp.float32
  depthwise: str = 'grouped'
  rate: float = 0.0
  site: int = 0

  @nn.compact
  def __call__(self, x, branch, drop_keys=None):
    y = _layer_norm('norm')(DepthwiseConv(7, dtype=self.dtype, impl=self.depthwise, name='conv_dw')(x))
    y = Mlp(self.dim, 4 * self.dim, self.dense, name='mlp')(y, branch)
    gamma = self.param('gamma', nn.initializers.constant(1e-6), (self.dim,))
    return x + stochastic_depth.drop_branch(gamma * y, drop_keys, self.rate, self.site)


class ConvNeXtStage(nn.Module):
  """timm's ConvNeXtStage: the downsampling layer (LayerNorm, 2x2 stride-2 convolution) if `downsample`,
  then `depth` blocks."""
  dim: int
  depth: int
  downsample: bool
  dense: Any
  lora: dict  # PatchConv's LoRa attributes for the downsampling convolution (lora=False: none)
  depthwise: str = 'grouped'  # the blocks' depthwise convolution (DEPTHWISE)
  rates: Sequence[float] = ()  # the blocks' drop-path rates (stochastic_depth.block_rates; () for none)
  first_site: int = 0  # the first block's branch number in the model (stochastic_depth.drop_branch)

  @nn.compact
  def __call__(self, x, branch, drop_keys=None):
    if self.downsample:
      x = _layer_norm('downsample_0')(x)
      x = PatchConv(self.dim, 2, name='downsample_1', **self.lora)(x, branch)
    rates = tuple(self.rates) or (0.0,) * self.depth
    for j in range(self.depth):
      x = ConvNeXtBlock(self.dim, self.dense, dtype=self.lora['dtype'], depthwise=self.depthwise, rate=rates[j],
                        site=self.first_site + j, name=f'blocks_{j}')(x, branch, drop_keys)
    return x


class ConvStem(nn.Module):
  """Singh et al.'s ConvStem for a ConvNeXt: [3x3 convolution with bias, channel LayerNorm, GELU] per
  (channels, stride) of `layers`; parameters stem_0, stem_1, stem_3, stem_4, ...: their nn.Sequential's
  indices."""
  layers: Sequence[Tuple[int, int]]
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, (c, stride) in enumerate(self.layers):
      x = StemConv(c, 3, stride, 1, conv_fn=self.conv_fn, dtype=self.dtype, name=f'stem_{3 * i}')(x)
      x = nn.gelu(_layer_norm(f'stem_{3 * i + 1}')(x), approximate=False)
    return x


class ConvNeXt(nn.Module):
  """A ConvNeXt in timm's layout with a LoRa branch; see the module docstring.

  Attributes:
    num_classes: outputs of the head.
    depths, dims: blocks and channels of the four stages (CONVNEXT_SIZES).
    convstem_layout: the ConvStem's layout for stem 'convstem' ('two' or 'three', convstem_layers).
    lora_rank, lora_alpha, lora_targets, lora_init: the LoRa branch (rank 0: none), its scale numerator, the
      layers that carry it (CONVNEXT_LORA_TARGETS) and the init of A (vit.LORA_INITS).
    input_size: side the input is resized to inside the model (a multiple of 32).
    stem: 'imagenet' (the 4x4 patchify stem) or 'convstem'.
    mean, std: per-channel input normalisation; None for none.
    conv_fn: the ConvStem's convolutions (`lora.ConvFn`).
    dtype: compute dtype of the matmuls and convolutions (parameters, LayerNorms, LoRa path, head: float32).
    precision: matmul precision on GPUs and TPUs, one of PRECISIONS.
    drop_path: the stochastic depth rate of the last block, in [0, 1) (`models.stochastic_depth`; the blocks'
      rates rise linearly from 0); used in training mode only, with `drop_keys`. Fine-tuning runs without it
      by default (0.0).
    bn_axis_name, twin_bn: the ResNets' BatchNorm attributes, for a common interface (no BatchNorm here).
    depthwise: how the blocks compute their 7x7 depthwise convolution, a DEPTHWISE key (`depthwise_for`
      picks it from config.model.conv_impl and the backend); the same numbers within float round-off.
  """
  num_classes: int
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  convstem_layout: str = 'two'
  lora_rank: int = 8
  lora_alpha: float = 1.0
  lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS
  lora_init: str = 'normal'
  input_size: int = 224
  stem: str = 'imagenet'
  mean: Optional[Sequence[float]] = IMAGENET_MEAN
  std: Optional[Sequence[float]] = IMAGENET_STD
  conv_fn: ConvFn = native_conv2d
  dtype: Any = jnp.float32
  precision: str = 'default'
  drop_path: float = 0.0
  bn_axis_name: Optional[str] = None
  twin_bn: bool = False
  depthwise: str = 'grouped'

  def __call__(self, x, branch='adv', train=False, bn='adaptive', drop_keys=None):
    """Logits (N, num_classes) for images x (N, H, W, C) in [0, 1]. `train` with drop_path > 0 drops the
    blocks' residual branches per example, drawn from drop_keys, one key per image (`models.stochastic_depth`);
    otherwise it changes nothing."""
    check_call(branch, self.precision, 'ConvNeXt', bn, self.twin_bn)
    check_convnext(self.stem, self.input_size, self.lora_targets, self.drop_path)
    stochastic_depth.check_call(self.drop_path, train, drop_keys, x.shape[0], 'ConvNeXt')
    with jax.default_matmul_precision(self.precision):
      return self._forward(x, branch, drop_keys if train and self.drop_path else None)

  @nn.compact
  def _forward(self, x, branch, drop_keys):
    x = model_input(x, self.input_size, self.mean, self.std)
    targets = tuple(self.lora_targets)
    lora = dict(rank=self.lora_rank, alpha=self.lora_alpha, lora_init=self.lora_init, dtype=self.dtype)

    def dense(features, name):
      return LoRaDense(features, (name,), lora=(name,) if name in targets else (), name=name, **lora)

    dims = tuple(self.dims)
    if self.stem == 'convstem':
      x = ConvStem(convstem_layers(self.convstem_layout, dims[0]), conv_fn=self.conv_fn, dtype=self.dtype,
                   name='stem')(x)
    else:
      x = PatchConv(dims[0], 4, dtype=self.dtype, name='stem_0')(x)
      x = _layer_norm('stem_1')(x)
    down = dict(lora='downsample' in targets, **lora)
    rates = stochastic_depth.block_rates(self.drop_path, self.depths)
    for i, (depth, dim) in enumerate(zip(self.depths, dims)):
      x = ConvNeXtStage(dim, depth, i > 0, dense, down, self.depthwise, rates[i], sum(self.depths[:i]),
                        name=f'stages_{i}')(x, branch, drop_keys)
    x = _layer_norm('head_norm')(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    return nn.Dense(self.num_classes, dtype=head_dtype, kernel_init=torch_linear_uniform(dims[-1]),
                    bias_init=torch_linear_uniform(dims[-1]), name='head')(x.astype(head_dtype))


def check_convnext(stem, input_size, lora_targets, drop_path_rate) -> None:
  """ValueError with the fix for a ConvNeXt setting it cannot build."""
  if stem not in CONVNEXT_STEMS:
    raise ValueError(f'A ConvNeXt takes stem {CONVNEXT_STEMS[0]!r} (the 4x4 patchify stem) or '
                     f'{CONVNEXT_STEMS[1]!r} (the convolutional stem), got {stem!r}.')
  if input_size % STRIDE:
    raise ValueError(f'A ConvNeXt downsamples by {STRIDE}: its input size must be a multiple of {STRIDE}, got '
                     f'{input_size} (224 is the checkpoints\' own).')
  unknown = [t for t in lora_targets if t not in CONVNEXT_LORA_TARGETS]
  if unknown or isinstance(lora_targets, str):
    raise ValueError(f'Unknown ConvNeXt LoRa target(s) {unknown or lora_targets!r}: lora_targets takes names from '
                     f'{CONVNEXT_LORA_TARGETS}.')
  stochastic_depth.check_rate(drop_path_rate)


def convnext(arch: str, num_classes: int, **kwargs) -> ConvNeXt:
  """ConvNeXt-T/S/B/L ('convnext_t', ...); `kwargs` are `ConvNeXt` attributes (depths and dims too)."""
  depths, dims, layout = CONVNEXT_SIZES[arch]
  kwargs = {'depths': depths, 'dims': dims, 'convstem_layout': layout, **kwargs}
  return ConvNeXt(num_classes=num_classes, **kwargs)


CONVNEXTS = {name: functools.partial(convnext, name) for name in CONVNEXT_SIZES}


def lora_targets(model_config) -> Tuple[str, ...]:
  """config.model.lora_targets for a ConvNeXt: its default (every ViT dense layer) means fc1 and fc2."""
  targets = tuple(model_config.get('lora_targets', DEFAULT_LORA_TARGETS))
  return DEFAULT_LORA_TARGETS if targets == VIT_DEFAULT_TARGETS else targets


def convnext_size(model_config) -> dict:
  """`config.model.convnext`'s sizes that are set: dim (the first stage's channels, doubled per stage) and
  depths (blocks per stage); 0 and () mean the architecture's own (CONVNEXT_SIZES)."""
  sizes = model_config.get('convnext') or {}
  out = {}
  if sizes.get('dim'):
    out['dims'] = tuple(int(sizes['dim']) * 2 ** i for i in range(4))
  if sizes.get('depths'):
    out['depths'] = tuple(int(d) for d in sizes['depths'])
  return out


def _attributes(model_config) -> dict:
  return {'lora_targets': lora_targets(model_config), 'lora_init': model_config.get('lora_init', 'normal'),
          'drop_path': float(model_config.get('drop_path', 0.0)),
          'depthwise': depthwise_for(model_config.get('conv_impl', 'auto'), jax.default_backend()),
          **convnext_size(model_config)}


def check_config(model_config) -> None:
  """ConfigError with the fix for a ConvNeXt `config.model` it cannot build."""
  m = model_config
  if m.stem not in CONVNEXT_STEMS:
    raise ConfigError(f'config.model.stem={m.stem!r} is not a ConvNeXt stem; config.model.arch={m.arch} takes '
                      "'imagenet' (the 4x4 patchify stem) or 'convstem' (the convolutional stem of Singh et al.), "
                      'e.g. --config.model.stem=convstem.')
  if m.input_size % STRIDE:
    up = max(STRIDE, -(-m.input_size // STRIDE) * STRIDE)
    raise ConfigError(f'config.model.input_size={m.input_size} is not a multiple of {STRIDE}, the ConvNeXt\'s '
                      f'downsampling: use e.g. --config.model.input_size={up} (224 is the ImageNet checkpoints\' '
                      'own).')
  targets = lora_targets(m)
  if isinstance(targets, str) or not targets or any(t not in CONVNEXT_LORA_TARGETS for t in targets):
    raise ConfigError(f'config.model.lora_targets={tuple(m.lora_targets)!r} has a name a ConvNeXt lacks: choose a '
                      f'non-empty list from {CONVNEXT_LORA_TARGETS} (fc1, fc2: the pointwise MLP; downsample: the '
                      "2x2 downsampling convolutions), e.g. --config.model.lora_targets=\"('fc1','fc2')\".")
  init = m.get('lora_init', 'normal')
  if init not in ('normal', 'kaiming_uniform'):
    raise ConfigError(f"config.model.lora_init={init!r} is not supported: choose 'normal' or 'kaiming_uniform'.")
  sizes = m.get('convnext') or {}
  dim, depths = sizes.get('dim', 0), tuple(sizes.get('depths', ()) or ())
  if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0 or dim % 4:
    raise ConfigError(f'config.model.convnext.dim must be 0 (the architecture\'s own) or a positive multiple of 4, '
                      f'got {dim!r}.')
  if depths and (len(depths) != 4 or any(not isinstance(d, int) or d < 1 for d in depths)):
    raise ConfigError(f'config.model.convnext.depths must be () (the architecture\'s own) or four positive '
                      f'integers, got {depths!r}.')
  if m.lora_placement != 'all':
    raise ConfigError(f"config.model.lora_placement={m.lora_placement!r} places LoRa in ResNet blocks; a ConvNeXt "
                      "places it by config.model.lora_targets: leave lora_placement at 'all'.")


SPECS = tuple(
    ArchSpec(name=name, label='ConvNeXt', builder=builder, attributes=_attributes, has_batchnorm=False,
             stems=CONVNEXT_STEMS, lora_placements=('all',), lora_targets=CONVNEXT_LORA_TARGETS,
             ignores=('width', 'pool_fn', 'lora_placement'), reference_code=False,
             converter='autolora_jax.convert.convnext', pretrained=f'{name}_linf_eps4.0', drop_path=True,
             check_config=check_config)
    for name, builder in CONVNEXTS.items())
