"""`create_model`, the one place a `config.model` sub-config becomes a model, and the architectures by name."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from autolora_jax.models.archs import ArchView, spec, specs
from autolora_jax.models.lora import ConvFn, native_conv2d
from autolora_jax.models.resnet import PoolFn, native_max_pool

# name -> (num_classes, **attributes) -> model, for every registered spec.
ARCHITECTURES = ArchView(lambda: {s.name: s.builder for s in specs()})


def is_vit(arch: str) -> bool:
  """Whether `arch` is a Vision Transformer (for users; the package asks `spec(arch)` what it needs)."""
  return any(s.name == arch and s.label == 'ViT' for s in specs())


def create_model(model_config, num_classes, *, conv_fn: Optional[ConvFn] = None,
                 pool_fn: Optional[PoolFn] = None, **overrides):
  """Builds the model a `config.model` ConfigDict describes (see configs/default.py), by `spec(arch)`.

  `model_config.conv_impl` is not read here: the caller turns it into `conv_fn` and `pool_fn`
  (ops.convolutions); None means XLA's own. `overrides` are other attributes of the model; those the
  architecture does not have (`ArchSpec.ignores`, e.g. a ViT's width and pool_fn) are dropped.

  Raises:
    ValueError for an unknown architecture or a lora_placement the architecture does not take.
  """
  arch = spec(model_config.arch)
  kwargs = dict(
      lora_rank=model_config.lora_rank,
      lora_alpha=model_config.lora_alpha,
      input_size=model_config.input_size,
      stem=model_config.stem,
      mean=tuple(model_config.mean) if model_config.mean is not None else None,
      std=tuple(model_config.std) if model_config.std is not None else None,
      conv_fn=conv_fn or native_conv2d,
      pool_fn=pool_fn or native_max_pool,
      dtype=jnp.dtype(model_config.dtype),
      precision=model_config.get('precision', 'default'),
      **arch.attributes(model_config),
  )
  kwargs.update(overrides)
  return arch.build(num_classes, **kwargs)


__all__ = ['ARCHITECTURES', 'create_model', 'is_vit']
