"""ResNet-18/-50 in torchvision's layout, with AutoLoRa's low-rank branch on the block convolutions.

Every model takes images in [0, 1], NHWC, and does inside itself what the reference model does: a
nearest-neighbour resize to `input_size` (PyTorch's `F.interpolate(mode='nearest')` index rule), a clamp
to [0, 1] and the input normalisation. Two branches share every weight and BatchNorm:

* ``branch='adv'``: the feature extractor (FE) as it is, W. This is the deployed model.
* ``branch='nat'``: every LoRa-carrying convolution uses W + dW, dW = reshape(B @ A) * alpha / rank.

Parameter names mirror torchvision's state-dict keys (``conv1``, ``bn1``, ``layer1_0/conv1``, ...,
``downsample_conv``, ``downsample_bn``) with the classifier called ``head``; LoRa parameters are
``lora_A`` and ``lora_B`` inside the convolution that owns them.

The convolution and the stem's max-pool are attributes (`conv_fn`, `pool_fn`; XLA's by default), as the
Flax ImageNet example passes its `conv` module: the model computes the same function with any of them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autolora_jax.models.archs import ArchSpec
from autolora_jax.models.batchnorm import TWIN_MODES, BatchNorm, TwinBatchNorm
from autolora_jax.models.lora import ConvFn, LoRaConv, native_conv2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BRANCHES = ('adv', 'nat')
STEMS = ('imagenet', 'cifar')
LORA_PLACEMENTS = ('all', 'last_block')
# The matmul precision of the convolutions on GPUs and TPUs (jax.default_matmul_precision): 'default' lets
# TPUs multiply float32 in bfloat16 and A100/H100 GPUs in TF32; 'high' (3 bfloat16 passes on TPUs, TF32 on
# GPUs) and 'highest' (float32) cost speed. CPUs compute float32 in float32 whatever it says.
PRECISIONS = ('default', 'high', 'highest')

# pool_fn(x, window, stride, padding) -> y: max-pooling of NHWC x with symmetric -inf padding.
PoolFn = Callable[[jax.Array, int, int, int], jax.Array]


def native_max_pool(x, window: int, stride: int, padding: int):
  """XLA's max-pooling (reduce-window) of NHWC x: PyTorch's MaxPool2d(window, stride, padding)."""
  pads = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def torch_linear_uniform(fan_in):
  """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_nearest_resize(x, size):
  """Resizes NHWC images to (size, size) with PyTorch's legacy 'nearest' rule src = floor(dst * in / out)."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == (size, size):
    return x

  def index(n_in):
    scale = np.float32(n_in / size)
    return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int32), n_in - 1)

  return x[:, index(h)][:, :, index(w)]


def model_input(x, size: int, mean, std):
  """Images x (N, H, W, C) in [0, 1] as every model's first layer sees them: resized to (size, size) with
  `torch_nearest_resize`, clamped to [0, 1] and normalised by the per-channel mean and std (None: as they are)."""
  x = jnp.clip(torch_nearest_resize(x, size), 0.0, 1.0)
  if mean is not None:
    x = (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)
  return x


def check_call(branch: str, precision: str, family: Optional[str] = None, bn: str = 'adaptive',
               twin_bn: bool = False) -> None:
  """ValueError for a forward pass's `branch` or matmul `precision` no model takes; with `family` (a model
  without BatchNorm, e.g. 'ViT'), also for a BatchNorm mode other than 'adaptive' or twin_bn=True."""
  if branch not in BRANCHES:
    raise ValueError(f"branch must be 'adv' or 'nat', got {branch!r}.")
  if family is not None and (bn != 'adaptive' or twin_bn):
    raise ValueError(f"A {family} has no BatchNorm: twin_bn must be False and bn 'adaptive' (of {TWIN_MODES}), "
                     f'got twin_bn={twin_bn}, bn={bn!r}.')
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}.')


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
    conv_fn: the convolution of every layer, `lora.ConvFn` (default XLA's; ops.convolutions gives the
      CPU ones).
    pool_fn: the ImageNet stem's max-pool, `PoolFn`, called as pool_fn(x, 3, 2, 1) (default XLA's).
    dtype: compute dtype of the convolutions (parameters stay float32); the pooled features, the head and
      the logits are float32 whatever it is (float64 for a float64 model): argmax ties and the margins of
      AutoAttack's DLR loss over 100-200 classes need more than bfloat16's 8 bits.
    precision: matmul precision of every convolution and the head on GPUs and TPUs, one of PRECISIONS.
    twin_bn: every BatchNorm doubled (`TwinBatchNorm`, TWINS): the call's `bn` picks the adaptive BNs
      (the deployed model, the default), the frozen ones, or 'mix' (first half of the batch frozen).
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
  conv_fn: ConvFn = native_conv2d
  pool_fn: PoolFn = native_max_pool
  dtype: Any = jnp.float32
  twin_bn: bool = False
  precision: str = 'default'

  def __call__(self, x, branch='adv', train=False, bn='adaptive'):
    """Logits of shape (N, num_classes) for images x of shape (N, H, W, C) in [0, 1].

    `bn` ('adaptive' | 'frozen' | 'mix'): which BatchNorm of each doubled pair (twin_bn only).
    """
    check_call(branch, self.precision)
    if bn not in TWIN_MODES or (bn != 'adaptive' and not self.twin_bn):
      raise ValueError(f"bn={bn!r}: a model with twin_bn=True takes one of {TWIN_MODES}; any other only "
                       "'adaptive'.")
    with jax.default_matmul_precision(self.precision):
      return self._forward(x, branch, train, bn)

  @nn.compact
  def _forward(self, x, branch, train, bn):
    if self.twin_bn:
      norm = functools.partial(TwinBatchNorm, mode=bn, use_running_average=not train,
                               axis_name=self.bn_axis_name)
    else:
      norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=self.bn_axis_name)

    def plain_conv(features, k, strides, padding, name):
      return LoRaConv(features, k, strides, padding, conv_fn=self.conv_fn, dtype=self.dtype, name=name)

    x = model_input(x, self.input_size, self.mean, self.std)

    if self.stem == 'imagenet':
      x = plain_conv(self.width, 7, 2, 3, 'conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = self.pool_fn(x, 3, 2, 1)
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
                          conv_fn=self.conv_fn, dtype=self.dtype, name=name)

        x = block_cls(self.width * 2**i, strides=2 if (i > 0 and j == 0) else 1, conv=block_conv,
                      norm=norm, name=f'layer{i + 1}_{j}')(x, branch)

    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    x = jnp.mean(x.astype(head_dtype), axis=(1, 2))
    fan_in = x.shape[-1]
    return nn.Dense(self.num_classes, dtype=head_dtype, kernel_init=torch_linear_uniform(fan_in),
                    bias_init=torch_linear_uniform(fan_in), name='head')(x)


def resnet18(num_classes, **kwargs) -> ResNet:
  """ResNet-18 (BasicBlock, 2-2-2-2). Keyword arguments are `ResNet`'s attributes."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block='basic', num_classes=num_classes, **kwargs)


def resnet50(num_classes, **kwargs) -> ResNet:
  """ResNet-50 (Bottleneck, 3-4-6-3). Keyword arguments are `ResNet`'s attributes."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block='bottleneck', num_classes=num_classes, **kwargs)


RESNETS = {'resnet18': resnet18, 'resnet50': resnet50}


def _attributes(model_config) -> dict:
  return {'width': model_config.width, 'lora_placement': model_config.lora_placement}


SPECS = tuple(
    ArchSpec(name=name, label='ResNet', builder=builder, attributes=_attributes, has_batchnorm=True,
             stems=STEMS, lora_placements=LORA_PLACEMENTS, reference_code=True,
             converter='autolora_jax.convert.resnet', pretrained=f'{name}_linf_eps4.0')
    for name, builder in RESNETS.items())
