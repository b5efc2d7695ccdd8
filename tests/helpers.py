"""Small builders shared by the tests: tiny models, batches and subprocess runners."""

import jax
import jax.numpy as jnp
import numpy as np

import tiny_runs
from autolora_jax import models, ops
from benchmarks import digits_mlp as digits_mlp_lib

ROOT = tiny_runs.ROOT


def tiny_resnet18(num_classes=5, conv_impl='native', **kwargs):
  """A width-8 ResNet-18 with the CIFAR stem at 16x16: every layer type, a fraction of the cost; its
  convolutions those `conv_impl` (ops.CONV_IMPLS) gives on this backend."""
  conv_fn, pool_fn = ops.convolutions(conv_impl, jax.default_backend())
  kw = dict(width=8, input_size=16, stem='cifar', conv_fn=conv_fn, pool_fn=pool_fn)
  kw.update(kwargs)
  return models.resnet18(num_classes, **kw)


def tiny_vit(num_classes=5, **kwargs):
  """A 2-block ViT of width 32 with 2 heads and 4x4 patches at 16x16 (16 tokens and the class token): every
  layer of ViT-S/16, a fraction of the cost."""
  kw = dict(dim=32, depth=2, heads=2, patch_size=4, input_size=16)
  kw.update(kwargs)
  return models.vit_s16(num_classes, **kw)


def tiny_convnext(num_classes=5, **kwargs):
  """A ConvNeXt of widths 8-16-32-64 with one block per stage at 32x32 (the smallest size its stride of 32
  takes): every layer of ConvNeXt-T, a fraction of the cost."""
  kw = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), input_size=32, lora_targets=('fc1', 'fc2', 'downsample'))
  kw.update(kwargs)
  return models.spec('convnext_t').build(num_classes, **kw)


def tiny_swin(num_classes=5, **kwargs):
  """A Swin of width 8 (1 head, both doubled per stage), blocks (2, 2, 1, 1) and window 4 at 32x32: a
  shifted, masked window stage and clamped ones, every layer of Swin-T."""
  kw = dict(dim=8, heads=1, depths=(2, 2, 1, 1), window=4, input_size=32)
  kw.update(kwargs)
  return models.spec('swin_t').build(num_classes, **kw)


def init(model, seed=0, size=16):
  """{'params', 'batch_stats'} of `model` ('batch_stats' empty for a ViT, as pretrain.init_variables)."""
  return {'batch_stats': {}, **model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))}


def random_batch(n=8, size=16, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.random((n, size, size, 3), dtype=np.float32),
          'label': rng.integers(0, num_classes, n).astype(np.int32),
          'index': np.arange(n, dtype=np.int32)}


def with_nonzero_lora_b(variables, seed=1, scale=0.05):
  """Variables whose LoRa B matrices are random (B = 0 at initialisation makes both branches equal)."""
  key = jax.random.PRNGKey(seed)

  def fill(path, value):
    nonlocal key
    if models.param_group(path) == 'lora' and path[-1].key == 'lora_B':
      key, sub = jax.random.split(key)
      return scale * jax.random.normal(sub, value.shape)
    return value

  return {**variables, 'params': jax.tree_util.tree_map_with_path(fill, variables['params'])}


def run_python(code, devices=1, timeout=600, env=None):
  """Runs `code` in a fresh interpreter with `devices` fake CPU devices (tiny_runs.run_python, with extra
  environment variables from `env`); returns the completed process."""
  return tiny_runs.run_python(code, devices=devices, timeout=timeout, **(env or {}))


digits_mlp = digits_mlp_lib.logits  # the AutoAttack tests' model (benchmarks/digits_mlp.py)
train_digits_mlp = digits_mlp_lib.train
