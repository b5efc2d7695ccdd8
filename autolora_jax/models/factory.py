"""The architectures by name and `create_model`, the one place a `config.model` sub-config becomes a model."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from autolora_jax.models.lora import ConvFn, native_conv2d
from autolora_jax.models.resnet import RESNETS, PoolFn, native_max_pool
from autolora_jax.models.vit import LORA_TARGETS, VIT_SIZES, vit_b16, vit_s16

VITS = {'vit_s16': vit_s16, 'vit_b16': vit_b16}
ARCHITECTURES = {**RESNETS, **VITS}  # name -> (num_classes, **attributes) -> model


def is_vit(arch: str) -> bool:
  return arch in VITS


def vit_size(model_config) -> dict:
  """`config.model.vit`'s dim, depth and heads that are set (0: the architecture's own, VIT_SIZES)."""
  sizes = model_config.get('vit') or {}
  return {k: int(sizes[k]) for k in ('dim', 'depth', 'heads') if sizes.get(k)}


def create_model(model_config, num_classes, *, conv_fn: Optional[ConvFn] = None,
                 pool_fn: Optional[PoolFn] = None, **overrides):
  """Builds the model a `config.model` ConfigDict describes (see configs/default.py): a `resnet.ResNet` or
  a `vit.ViT` by `model_config.arch`.

  `model_config.conv_impl` is not read here: the caller turns it into `conv_fn` and `pool_fn`
  (ops.convolutions); None means XLA's own. `overrides` are other attributes of the model; for a ViT the
  ResNet-only ones (width, pool_fn, lora_placement 'all') have no meaning and are dropped.
  """
  common = dict(
      lora_rank=model_config.lora_rank,
      lora_alpha=model_config.lora_alpha,
      input_size=model_config.input_size,
      stem=model_config.stem,
      mean=tuple(model_config.mean) if model_config.mean is not None else None,
      std=tuple(model_config.std) if model_config.std is not None else None,
      conv_fn=conv_fn or native_conv2d,
      dtype=jnp.dtype(model_config.dtype),
      precision=model_config.get('precision', 'default'),
  )
  if not is_vit(model_config.arch):
    kwargs = dict(common, width=model_config.width, lora_placement=model_config.lora_placement,
                  pool_fn=pool_fn or native_max_pool)
    kwargs.update(overrides)
    return RESNETS[model_config.arch](num_classes, **kwargs)
  kwargs = dict(common, lora_targets=tuple(model_config.get('lora_targets', LORA_TARGETS)),
                lora_init=model_config.get('lora_init', 'normal'), **vit_size(model_config))
  if overrides.get('lora_placement', 'all') != 'all':
    raise ValueError(f"lora_placement={overrides['lora_placement']!r} places LoRa in ResNet blocks; a ViT "
                     'places it by lora_targets.')
  kwargs.update({k: v for k, v in overrides.items() if k not in ('width', 'pool_fn', 'lora_placement')})
  return VITS[model_config.arch](num_classes, **kwargs)


__all__ = ['ARCHITECTURES', 'VITS', 'VIT_SIZES', 'create_model', 'is_vit', 'vit_size']
