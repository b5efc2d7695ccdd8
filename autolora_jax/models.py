"""ResNet-18/-50 in torchvision's layout, with AutoLoRa's low-rank branch on the block convolutions.

Every model takes images in [0, 1], NHWC, and does inside itself what the reference model does: a
nearest-neighbour resize to `input_size` (PyTorch's `F.interpolate(mode='nearest')` index rule), a clamp
to [0, 1] and the input normalisation. Two branches share every weight and BatchNorm:

* ``branch='adv'``: the feature extractor (FE) as it is, W. This is the deployed model.
* ``branch='nat'``: every LoRa-carrying convolution uses W + dW, dW = reshape(B @ A) * alpha / rank.

Parameter names mirror torchvision's state-dict keys (``conv1``, ``bn1``, ``layer1_0/conv1``, ...,
``downsample_conv``, ``downsample_bn``) with the classifier called ``head``; LoRa parameters are
``lora_A`` and ``lora_B`` inside the convolution that owns them.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from autolora_jax import conv_ops, winograd

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BRANCHES = ('adv', 'nat')
STEMS = ('imagenet', 'cifar')
LORA_PLACEMENTS = ('all', 'last_block')
CONV_IMPLS = ('auto', 'native', 'im2col', 'explicit', 'winograd')


# ----------------------------------------------------------------------------------------------------------
# Initialisers (PyTorch / torchvision defaults)
# ----------------------------------------------------------------------------------------------------------

def _kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """torchvision's ResNet conv init: N(0, 2 / fan_out), fan_out = k * k * C_out (HWIO kernel)."""
  kh, kw, _, c_out = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (kh * kw * c_out))


def _torch_linear_uniform(fan_in):
  """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------

def lora_delta(lora_a, lora_b, kernel_shape, scale):
  """dW in Flax's HWIO layout, computed in PyTorch's order as SPEC.md defines it.

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


def conv2d(x, kernel, stride, padding, impl='native'):
  """2-D convolution with explicit symmetric padding, NHWC x HWIO -> NHWC.

  All implementations compute the same function and gradients (up to float rounding):
  'native' is XLA's convolution; 'im2col' gathers the k*k shifted strided views and does one matmul
  (several times faster than XLA's native convolution on CPUs for small feature maps); 'explicit' is the
  native forward with gradients written out (conv_ops.conv_explicit, for CPUs); 'winograd' computes 3 x 3,
  stride-1, padding-1 convolutions as F(m x m, 3 x 3) with m = `winograd_tile` of the output side
  (winograd.conv3x3, for CPUs) and any other one as 'explicit'.
  """
  pads = ((padding, padding), (padding, padding))
  if impl == 'native':
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if impl == 'winograd':
    if kernel.shape[:2] == (3, 3) and stride == 1 and padding == 1:
      return winograd.conv3x3(x, kernel, winograd_tile(max(x.shape[1], x.shape[2])) or 2)
    impl = 'explicit'
  if impl == 'explicit':
    return conv_ops.conv_explicit(x, kernel, stride, padding)
  kh, kw, c_in, c_out = kernel.shape
  if kh == kw == 1:
    return x[:, ::stride, ::stride, :] @ kernel.reshape(c_in, c_out)
  x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  h_out = (x.shape[1] - kh) // stride + 1
  w_out = (x.shape[2] - kw) // stride + 1
  patches = [
      x[:, i:i + stride * (h_out - 1) + 1:stride, j:j + stride * (w_out - 1) + 1:stride, :]
      for i in range(kh) for j in range(kw)
  ]
  return jnp.concatenate(patches, axis=-1) @ kernel.reshape(kh * kw * c_in, c_out)


# On CPUs (2-core AMD EPYC machines, benchmarks/step.py and layer timings, XLA's own convolution kernels as
# host.set_xla_cpu_flags selects them): XLA's native convolution is as fast as a matmul for outputs of 4 x 4
# and more but pathological for the smallest ones (2 x 2 outputs with 256 channels, batch 32: 27 ms where
# im2col takes 1.3 ms), and its input gradients of strided convolutions are slow (the ResNet-18 stem at 224:
# 196 ms, 91 ms written out); so 'auto' uses im2col up to 3 x 3 outputs and for 1 x 1 kernels (a matmul),
# Winograd for the 3 x 3 stride-1 convolutions whose output side `winograd_tile` gives a tile, and the
# native forward with explicit gradients (conv_ops.conv_explicit) for the rest.
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


def resolve_conv_impl(impl, out_side: Optional[int] = None, kernel_size: Optional[int] = None,
                      stride: int = 1, channels: Optional[int] = None):
  """The implementation `conv2d` uses for a k x k convolution whose output is out_side x out_side.

  'auto' picks the native convolution on GPUs and TPUs; on CPUs im2col for layers of fewer than
  NARROW_CHANNELS `channels` (the wider of input and output), for 1 x 1 kernels and for outputs of at most
  IM2COL_MAX_SIDE per side, 'winograd' for 3 x 3 stride-1 convolutions that `winograd_tile` gives a tile,
  'explicit' for the others (im2col for all when out_side is None).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}.')
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native'
    if (out_side is None or out_side <= IM2COL_MAX_SIDE or kernel_size == 1
        or (channels is not None and channels < NARROW_CHANNELS)):
      return 'im2col'
    if kernel_size == 3 and stride == 1 and winograd_tile(out_side):
      return 'winograd'
    return 'explicit'
  return impl


def max_pool(x, conv_impl='native'):
  """PyTorch's MaxPool2d(3, stride 2, padding 1): XLA's reduce-window for conv_impl 'native' (and 'auto'
  off CPUs), else conv_ops.max_pool (same values and gradients, a much faster gradient on CPUs)."""
  if conv_impl == 'native' or (conv_impl == 'auto' and jax.default_backend() != 'cpu'):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return conv_ops.max_pool(x, 3, 2, 1)


def torch_nearest_resize(x, size):
  """Resizes NHWC images to (size, size) with PyTorch's legacy 'nearest' rule src = floor(dst * in / out)."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == (size, size):
    return x

  def index(n_in):
    scale = np.float32(n_in / size)
    return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int32), n_in - 1)

  return x[:, index(h)][:, :, index(w)]


class LoRaConv(nn.Module):
  """A bias-free convolution whose kernel W may carry a LoRa branch (rank > 0).

  Attributes:
    features: C_out.
    kernel_size: k (square kernels).
    strides, padding: as torch.nn.Conv2d (symmetric explicit padding).
    rank: LoRa rank r; 0 means a plain convolution without LoRa parameters.
    alpha: LoRa scaling numerator, dW is scaled by alpha / rank.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  rank: int = 0
  alpha: float = 1.0
  conv_impl: str = 'native'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, branch='adv'):
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features)
    kernel = self.param('kernel', _kaiming_normal_fan_out, shape)
    if self.rank > 0:
      lora_a = self.param('lora_A', nn.initializers.normal(1.0), (self.rank * k, shape[2] * k))
      lora_b = self.param('lora_B', nn.initializers.zeros, (self.features * k, self.rank * k))
      if branch == 'nat':
        kernel = kernel + lora_delta(lora_a, lora_b, shape, self.alpha / self.rank)
    out_side = (max(x.shape[1], x.shape[2]) + 2 * self.padding - k) // self.strides + 1
    impl = resolve_conv_impl(self.conv_impl, out_side, k, self.strides, max(shape[2], shape[3]))
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding, impl)


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's semantics (eps 1e-5, momentum 0.1 in PyTorch terms).

  Normalises with the biased batch variance and updates the running variance with the unbiased one,
  as torch.nn.BatchNorm2d does (Flax's own BatchNorm stores the biased one). Statistics and the
  normalisation are computed in float32 (the output has x's dtype); statistics are reduced across the
  devices of `axis_name` (synchronised BatchNorm), so that any number of devices
  computes what one device computes on the whole batch.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      count = x.shape[0] * x.shape[1] * x.shape[2]
      mean = jnp.mean(xf, axis=(0, 1, 2))
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))  # two passes: exact for large activations
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
        count = count * lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    mul = scale * lax.rsqrt(var + self.epsilon)
    # Normalised in float32 whatever x's dtype: in training, BatchNorm's input gradient is a difference
    # of nearly equal terms, which bfloat16 would turn into noise (30% error in every FE gradient).
    return (x.astype(jnp.float32) * mul + (bias - mean * mul)).astype(x.dtype)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (expansion 1)."""
  features: int
  strides: int
  conv: Any
  norm: Any
  expansion = 1

  @nn.compact
  def __call__(self, x, branch):
    residual = x
    y = self.conv(self.features, 3, self.strides, 1, name='conv1')(x, branch)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, 3, 1, 1, name='conv2')(y, branch)
    y = self.norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = self.conv(self.features, 1, self.strides, 0, name='downsample_conv', shortcut=True)(
          x, branch)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride sits on the 3x3 convolution; expansion 4)."""
  features: int
  strides: int
  conv: Any
  norm: Any
  expansion = 4

  @nn.compact
  def __call__(self, x, branch):
    residual = x
    out = self.features * self.expansion
    y = self.conv(self.features, 1, 1, 0, name='conv1')(x, branch)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, 3, self.strides, 1, name='conv2')(y, branch)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(out, 1, 1, 0, name='conv3')(y, branch)
    y = self.norm(name='bn3')(y)
    if self.strides != 1 or x.shape[-1] != out:
      residual = self.conv(out, 1, self.strides, 0, name='downsample_conv', shortcut=True)(x, branch)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet in torchvision's layout with a LoRa branch; see the module docstring.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    num_classes: outputs of the linear head.
    width: channels of the first stage (64 in the paper); stages use width * (1, 2, 4, 8).
    lora_rank: LoRa rank r; 0 builds the FE without any LoRa parameters.
    lora_alpha: LoRa scale numerator (dW is scaled by alpha / r).
    lora_placement: 'all' (every block convolution and the projection shortcut) or 'last_block' (only
      the convolutions of the last block of each stage, no shortcut: the authors' public code).
    input_size: side the input is resized to inside the model.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
    mean, std: per-channel input normalisation; None for none.
    bn_axis_name: the mapped axis BatchNorm reduces over in training (set by the train step under pmap).
    conv_impl: 'auto' | 'native' | 'im2col' | 'explicit' (see `conv2d` and `resolve_conv_impl`).
    dtype: compute dtype of convolutions and the head (parameters stay float32).
  """
  stage_sizes: Sequence[int]
  block: str
  num_classes: int
  width: int = 64
  lora_rank: int = 8
  lora_alpha: float = 1.0
  lora_placement: str = 'all'
  input_size: int = 224
  stem: str = 'imagenet'
  mean: Optional[Sequence[float]] = IMAGENET_MEAN
  std: Optional[Sequence[float]] = IMAGENET_STD
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, branch='adv', train=False):
    """Logits of shape (N, num_classes) for images x of shape (N, H, W, C) in [0, 1]."""
    if branch not in BRANCHES:
      raise ValueError(f"branch must be 'adv' or 'nat', got {branch!r}.")
    conv_impl = self.conv_impl  # resolved per layer by LoRaConv (see resolve_conv_impl)
    norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=self.bn_axis_name)

    def plain_conv(features, k, strides, padding, name):
      return LoRaConv(features, k, strides, padding, conv_impl=conv_impl, dtype=self.dtype, name=name)

    x = torch_nearest_resize(x, self.input_size)
    x = jnp.clip(x, 0.0, 1.0)
    if self.mean is not None:
      x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

    if self.stem == 'imagenet':
      x = plain_conv(self.width, 7, 2, 3, 'conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = max_pool(x, self.conv_impl)
    elif self.stem == 'cifar':
      x = plain_conv(self.width, 3, 1, 1, 'conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      raise ValueError(f'stem must be one of {STEMS}, got {self.stem!r}.')

    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        if self.lora_placement == 'all':
          in_block, on_shortcut = True, True
        elif self.lora_placement == 'last_block':
          in_block, on_shortcut = j == n_blocks - 1, False
        else:
          raise ValueError(f'lora_placement must be one of {LORA_PLACEMENTS}, got {self.lora_placement!r}.')

        def block_conv(features, k, strides, padding, name, shortcut=False, _lora=in_block,
                       _short=on_shortcut):
          rank = self.lora_rank if (_short if shortcut else _lora) else 0
          return LoRaConv(features, k, strides, padding, rank=rank, alpha=self.lora_alpha,
                          conv_impl=conv_impl, dtype=self.dtype, name=name)

        x = block_cls(self.width * 2**i, strides=2 if (i > 0 and j == 0) else 1, conv=block_conv,
                      norm=norm, name=f'layer{i + 1}_{j}')(x, branch)

    x = jnp.mean(x, axis=(1, 2))
    fan_in = x.shape[-1]
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_torch_linear_uniform(fan_in),
                 bias_init=_torch_linear_uniform(fan_in), name='head')(x)
    return x.astype(jnp.float32)


def resnet18(num_classes, **kwargs) -> ResNet:
  """ResNet-18 (BasicBlock, 2-2-2-2). Keyword arguments are `ResNet`'s attributes."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block='basic', num_classes=num_classes, **kwargs)


def resnet50(num_classes, **kwargs) -> ResNet:
  """ResNet-50 (Bottleneck, 3-4-6-3). Keyword arguments are `ResNet`'s attributes."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block='bottleneck', num_classes=num_classes, **kwargs)


ARCHITECTURES = {'resnet18': resnet18, 'resnet50': resnet50}


def create_model(model_config, num_classes, **overrides) -> ResNet:
  """Builds the model a `config.model` ConfigDict describes (see configs/default.py)."""
  kwargs = dict(
      width=model_config.width,
      lora_rank=model_config.lora_rank,
      lora_alpha=model_config.lora_alpha,
      lora_placement=model_config.lora_placement,
      input_size=model_config.input_size,
      stem=model_config.stem,
      mean=tuple(model_config.mean) if model_config.mean is not None else None,
      std=tuple(model_config.std) if model_config.std is not None else None,
      conv_impl=model_config.conv_impl,
      dtype=jnp.dtype(model_config.dtype),
  )
  kwargs.update(overrides)
  return ARCHITECTURES[model_config.arch](num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------------

def param_group(path) -> str:
  """'lora' for LoRa parameters, 'head' for the classifier, 'fe' for the feature extractor (conv + BN)."""
  names = [getattr(p, 'key', getattr(p, 'name', str(p))) for p in path]
  if names and names[-1] in ('lora_A', 'lora_B'):
    return 'lora'
  if names and names[0] == 'head':
    return 'head'
  return 'fe'


def param_groups(params):
  """A pytree of the same structure as params whose leaves are 'fe', 'lora' or 'head'."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def lora_params_count(params) -> int:
  """Number of LoRa parameters in a params tree."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(int(np.prod(v.shape)) for p, v in leaves if param_group(p) == 'lora')
