"""What every family's mapping shares: --arch names, PyTorch <-> Flax array layouts, the model's parameter
template and putting state-dict keys on it."""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from autolora_jax import models


def arch_for(model_arch: str, stem: str) -> str:
  """The --arch name of a model config: ('resnet18', 'cifar') -> 'resnet18_cifar'."""
  return model_arch if stem == 'imagenet' else f'{model_arch}_{stem}'


def converted_archs(converter: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
  """--arch -> (config.model.arch, stem) for every stem of every spec with a converter (that `converter`,
  a module name, if given), e.g. {'resnet18': ('resnet18', 'imagenet'), 'resnet18_cifar': (...), ...}."""
  return {arch_for(s.name, stem): (s.name, stem) for s in models.specs()
          if s.converter and (converter is None or s.converter == converter) for stem in s.stems}


def to_flax(value: np.ndarray) -> np.ndarray:
  """OIHW conv weight -> HWIO kernel; (out, in) linear weight -> (in, out); vectors (and a ViT's tokens)
  unchanged."""
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def torch_shape(flax_shape: Sequence[int]) -> Tuple[int, ...]:
  """The PyTorch shape of a Flax leaf shape (inverse of `to_flax`)."""
  s = tuple(flax_shape)
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  if len(s) == 2:
    return (s[1], s[0])
  return s


def torch_layout(value: np.ndarray) -> np.ndarray:
  """HWIO kernel -> OIHW weight; (in, out) kernel -> (out, in); the rest unchanged (inverse of `to_flax`)."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T
  return value


def template(model, input_size: int) -> Dict[str, Tuple[int, ...]]:
  """{'params/...': shape, 'batch_stats/...': shape} of `model` (no computation: jax.eval_shape)."""
  x = jnp.zeros((1, input_size, input_size, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}


def module_path(mods: Sequence[str], numbered: Sequence[str]) -> str:
  """The Flax module path of a timm key's module names: a number after one of `numbered` joins it
  (['blocks', '3', 'mlp'] -> 'blocks_3/mlp')."""
  names = []
  for m in mods:
    if m.isdigit() and names and names[-1] in numbered:
      names[-1] = f'{names[-1]}_{m}'
    else:
      names.append(m)
  return '/'.join(names)


def torch_modules(mods: Sequence[str], numbered: Sequence[str]) -> list:
  """`module_path`'s inverse, on the path's parts: ['blocks_3', 'mlp'] -> ['blocks', '3', 'mlp']."""
  names = []
  for m in mods:
    found = re.fullmatch(rf'({"|".join(numbered)})_(\d+)', m)
    names += [found.group(1), found.group(2)] if found else [m]
  return names


def weight_path(module: str, leaf: str, value: np.ndarray) -> str:
  """'params/<module>/bias' for a bias; for a weight '.../scale' when it is 1-D (a LayerNorm's), else
  '.../kernel'."""
  if leaf == 'bias':
    return f'params/{module}/bias'
  return f'params/{module}/' + ('scale' if np.ndim(value) == 1 else 'kernel')


def map_weights(weights: Dict[str, np.ndarray], shapes: Dict[str, Tuple[int, ...]], path_of, arch: str):
  """Every key of a state dict put on the template path `path_of(key, value)` names, `to_flax`-ed to float32
  (BatchNorm's num_batches_tracked skipped).

  Returns:
    (flat {'collection/.../leaf': array}, unused keys (no path, or one the template lacks), shape
    mismatches as messages naming the shape `arch` expects, template paths no key filled or mismatched).
  """
  flat, unused, mismatched, mismatched_paths = {}, [], [], set()
  for key in sorted(weights):
    value = weights[key]
    if key.endswith('num_batches_tracked'):
      continue
    path = path_of(key, value)
    if path is None or path not in shapes:
      unused.append(key)
      continue
    converted = to_flax(value)
    if tuple(converted.shape) != shapes[path]:
      mismatched.append(f'{key} has shape {tuple(value.shape)}, {arch} expects {torch_shape(shapes[path])}')
      mismatched_paths.add(path)
      continue
    flat[path] = converted.astype(np.float32)
  missing = [p for p in shapes if p not in flat and p not in mismatched_paths]
  return flat, unused, mismatched, missing
