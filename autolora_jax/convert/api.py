"""The conversion itself, family by family through convert/families.py: a state dict to variables and meta
(`convert_state_dict`, `convert_file`), the model a converted checkpoint describes (`build_model`, through
`models.create_model`), fresh LoRa factors (`add_lora`), and the mapping read backwards for the export
(`export_state_dict`)."""

from __future__ import annotations

import logging
import os
from typing import Dict, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from autolora_jax import hub, models, ops
from autolora_jax.convert import families
from autolora_jax.convert.common import torch_layout
from autolora_jax.convert.reading import read_state_dict, split_state_dict
from autolora_jax.errors import CheckpointError

log = logging.getLogger(__name__)

NORMALIZATIONS = ('auto', 'checkpoint', 'imagenet', 'none')
FORMAT_VERSION = 1

Normalization = Union[str, Tuple[Sequence[float], Sequence[float]]]


def convert_state_dict(weights: Dict[str, np.ndarray], arch: str, source: str = 'the checkpoint'):
  """Maps a prefix-free state dict onto the model of --arch `arch` (its family's mapping).

  Returns:
    (variables, report): variables {'params', 'batch_stats'} of the model without LoRa (FE and head,
    numpy float32); report['num_classes'], report['unused'] (keys not mapped) and the family's sizes
    (a ResNet's width; a ViT's dim, depth, heads, input_size).
  Raises:
    CheckpointError naming what does not fit: another family (with the --arch to use where it has one),
    missing keys, mismatched shapes.
  """
  model_arch, stem = families.check_arch(arch)
  mapping = families.mapping(model_arch)
  if not any(a in weights for a in families.anchors(mapping)):
    other = families.identify(weights)
    if other is not None:
      name = other.describe(weights)
      if name in families.ARCHS:
        raise CheckpointError(f'{source} holds a {other.LABEL} ({name}), not a {arch}: convert it with '
                              f'--arch={name}.')
      raise CheckpointError(f'{source} holds no {mapping.LABEL} (no {mapping.ANCHOR}), but --arch={arch}; it '
                            f'looks like {name}.')
  return mapping.convert_state_dict(weights, arch, model_arch, stem, source)


def deployed_paths(variables: dict):
  """The deployed model's leaves of `variables` ({'params', 'batch_stats'}) as sorted
  ('collection/.../leaf', array) pairs: the adversarial branch, without the LoRa factors and the frozen
  BatchNorm twins of TWINS."""
  out = []
  for collection in ('params', 'batch_stats'):
    for path, value in traverse_util.flatten_dict(variables.get(collection, {}), sep='/').items():
      name = path.rsplit('/', 1)[-1]
      if name in ('lora_A', 'lora_B') or models.frozen_twin_source(name) is not None:
        continue
      out.append((f'{collection}/{path}', value))
  return sorted(out)


def export_state_dict(variables: dict, arch: str) -> Dict[str, np.ndarray]:
  """The deployed model of `variables` as a PyTorch state dict: the converter's mapping read backwards.

  Keys are torchvision's ResNet names (ImageNet stem), the CIFAR layout's (arch '..._cifar') or timm's ViT
  names; arrays are float32 numpy in PyTorch's layouts (OIHW, (out, in)). `convert_state_dict` of the
  result gives `variables` back without LoRa; ResNets also get BatchNorm's num_batches_tracked (0), as
  torchvision's state dicts have it.
  """
  model_arch, stem = families.check_arch(arch)
  mapping = families.mapping(model_arch)
  state = {}
  for path, value in deployed_paths(variables):
    key = mapping.torch_key(path, stem)
    value = np.asarray(value, np.float32)
    # A mapping may define torch_value(path, value) for a leaf whose layout is not the convolution's or
    # the linear layer's (a Swin's relative position bias table).
    value = mapping.torch_value(path, value) if hasattr(mapping, 'torch_value') else torch_layout(value)
    state[key] = np.ascontiguousarray(value)
    if key.endswith('.running_var'):
      state[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return state


def resolve_normalization(normalization: Normalization, checkpoint_normalizer, arch: str):
  """(mean, std, how) the converted model applies; mean/std are tuples or None (no normalisation).

  'auto': the checkpoint's normaliser if it has one, else the ImageNet statistics for ImageNet-stem
  architectures and ViTs and none for the CIFAR layout; 'checkpoint': its normaliser (an error if it has none);
  'imagenet'; 'none'; or an explicit (mean, std) pair.
  """
  _, stem = families.check_arch(arch)
  if not isinstance(normalization, str):
    mean, std = (tuple(float(v) for v in normalization[0]), tuple(float(v) for v in normalization[1]))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise CheckpointError(f'A given normalisation needs 3 means and 3 positive stds, got {normalization}.')
    return mean, std, 'given'
  if normalization not in NORMALIZATIONS:
    raise CheckpointError(f'normalization={normalization!r}: choose one of {NORMALIZATIONS} or give '
                          '(mean, std).')
  if normalization == 'none':
    return None, None, 'none'
  if normalization == 'imagenet':
    return models.IMAGENET_MEAN, models.IMAGENET_STD, 'imagenet'
  if checkpoint_normalizer is not None:
    mean, std = (tuple(checkpoint_normalizer[0]), tuple(checkpoint_normalizer[1]))
    if (np.allclose(mean, models.IMAGENET_MEAN, rtol=0, atol=1e-6)
        and np.allclose(std, models.IMAGENET_STD, rtol=0, atol=1e-6)):
      return models.IMAGENET_MEAN, models.IMAGENET_STD, 'checkpoint'  # the float32 copies of the constants
    if stem != 'cifar':
      log.warning('The checkpoint\'s normaliser (mean %s, std %s) differs from the ImageNet statistics '
                  '(mean %s, std %s); the converted model applies the checkpoint\'s.', mean, std,
                  models.IMAGENET_MEAN, models.IMAGENET_STD)
    return mean, std, 'checkpoint'
  if normalization == 'checkpoint':
    raise CheckpointError('normalization=checkpoint, but the checkpoint has no normaliser '
                          '(normalizer.new_mean/new_std): choose imagenet, none or give mean/std.')
  if stem != 'cifar':
    return models.IMAGENET_MEAN, models.IMAGENET_STD, 'imagenet'
  log.warning('The CIFAR-layout checkpoint has no normaliser: the converted model takes [0, 1] inputs without '
              'normalisation. If it was trained with a mean/std, convert it with --mean/--std.')
  return None, None, 'none'


def convert_file(path: str, arch: str, normalization: Normalization = 'auto',
                 allow_pickle: bool = False) -> Tuple[dict, dict]:
  """Reads and converts a checkpoint file: PyTorch (.ckpt/.pt/.pth), .safetensors, or either as a hub path
  hf://ORG/REPO/PATH[@REVISION] (downloaded into huggingface_hub's cache, `hub.resolve`).

  Returns:
    (variables, meta): variables {'params', 'batch_stats'} of the FE and its head (no LoRa), meta the
    JSON-serialisable description (arch, model_arch, stem, width, num_classes, mean, std, normalization,
    layout, source, unused_keys; for a ViT also dim (= width), depth, heads and input_size, its position
    grid's) that `build_model` and `config.pretrained` use.
  """
  model_arch, stem = families.check_arch(arch)
  source = str(hub.parse_hub_path(path)) if hub.is_hub_path(path) else os.path.abspath(path)
  state = read_state_dict(path, allow_pickle=allow_pickle)
  weights, info = split_state_dict(state)
  variables, report = convert_state_dict(weights, arch, source=path)
  mean, std, how = resolve_normalization(normalization, info['normalizer'], arch)
  unused = info['unused'] + [info['prefix'] + k for k in report['unused']]
  if unused:
    log.warning('Not used from %s (not part of a %s): %s', path, arch, ', '.join(unused))
  meta = {'format_version': FORMAT_VERSION, 'arch': arch, 'model_arch': model_arch, 'stem': stem,
          **families.mapping(model_arch).meta(report), 'num_classes': report['num_classes'],
          'mean': list(mean) if mean is not None else None, 'std': list(std) if std is not None else None,
          'normalization': how, 'layout': info['layout'], 'source': source,
          'unused_keys': unused}
  return variables, meta


def build_model(meta: dict, lora_rank: int = 8, conv_impl: str = 'auto', **overrides):
  """The model a converted checkpoint's meta describes (its head size and input normalisation).

  `conv_impl` (ops.CONV_IMPLS) gives the convolutions for this process's default backend; `overrides`
  are `models.ResNet` or `models.ViT` attributes (input_size defaults to 224 for the ImageNet stem, 32 for
  the CIFAR layout and the position grid's for a ViT).
  """
  conv_fn, pool_fn = ops.convolutions(conv_impl, jax.default_backend())
  config = model_config(meta, lora_rank)
  config.conv_impl = conv_impl  # a ConvNeXt's depthwise convolutions follow it too (convnext.depthwise_for)
  return models.create_model(config, meta['num_classes'], conv_fn=conv_fn, pool_fn=pool_fn, **overrides)


def model_config(meta: dict, lora_rank: int = 8) -> ml_collections.ConfigDict:
  """The `config.model` of a converted checkpoint's meta: its architecture, stem, input normalisation and
  sizes (its family's `model_config`), the LoRa rank given, the other keys at configs/default.py's values."""
  return ml_collections.ConfigDict(dict(
      arch=meta['model_arch'], stem=meta['stem'], lora_rank=lora_rank, lora_alpha=1.0, lora_placement='all',
      mean=meta['mean'], std=meta['std'], dtype='float32', precision='default',
      **families.mapping(meta['model_arch']).model_config(meta)))


def add_lora(model, variables: dict, seed: int = 0) -> dict:
  """`variables` (FE and head) completed with the model's LoRa parameters: A ~ N(0, 1) (a ViT's by its
  lora_init), B = 0 (docs/method.md); a ViT's position embedding resampled to the model's input size.

  Uses only the model's parameter shapes (no forward pass is compiled).
  """
  size = model.input_size
  a_init = models.lora_a_init(getattr(model, 'lora_init', 'normal'))
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  key = jax.random.PRNGKey(seed)
  out = {'batch_stats': {}}
  for collection, tree in shapes.items():
    flat = traverse_util.flatten_dict(tree)
    have = traverse_util.flatten_dict(variables.get(collection, {}))
    filled = {}
    for i, (path, leaf) in enumerate(sorted(flat.items())):
      if path[-1] == 'lora_A':
        filled[path] = np.asarray(a_init(jax.random.fold_in(key, i), leaf.shape, leaf.dtype))
      elif path[-1] == 'lora_B':
        filled[path] = np.zeros(leaf.shape, leaf.dtype)
      elif path in have and np.shape(fitted := models.fit_pretrained(path, have[path], leaf.shape)) == tuple(
          leaf.shape):
        filled[path] = np.asarray(fitted, leaf.dtype)
      else:
        raise CheckpointError(f'The converted variables lack {collection}/{"/".join(path)} {leaf.shape} '
                              'that the model needs.')
    out[collection] = traverse_util.unflatten_dict(filled)
  return out


def from_torch(path: str, arch: str, lora_rank: int = 8, *, normalization: Normalization = 'auto',
               allow_pickle: bool = False, seed: int = 0, **model_overrides):
  """A PyTorch ResNet or ViT checkpoint as (model, variables) of this project.

  The model is configured as the checkpoint needs (architecture, stem, width, head size, input
  normalisation); variables = {'params', 'batch_stats'} with the checkpoint's weights and statistics and
  fresh LoRa parameters (A ~ N(0, 1) from `seed`, B = 0), so that
  `model.apply(variables, x, branch='adv', train=False)` reproduces the checkpoint's logits for images x
  in [0, 1] at the model's input_size, and branch='nat' gives the same until B moves.

  Args:
    path: a .ckpt / .pt / .pth or .safetensors file, or one on the hub, hf://ORG/REPO/PATH[@REVISION] (see
      the module docstring for the layouts read).
    arch: one of ARCHS ('resnet18', 'resnet50', 'resnet18_cifar', 'vit_s16', 'vit_b16', 'vit_s16_convstem',
      'vit_b16_convstem').
    lora_rank: LoRa rank r (0: no LoRa parameters).
    normalization: see `resolve_normalization`.
    allow_pickle: read files that hold Python objects besides tensors (runs code from the file).
    **model_overrides: `build_model`'s conv_impl and other `models.ResNet` or `models.ViT` attributes
      (input_size, lora_placement, lora_targets, dtype).
  """
  variables, meta = convert_file(path, arch, normalization=normalization, allow_pickle=allow_pickle)
  model = build_model(meta, lora_rank=lora_rank, **model_overrides)
  return model, add_lora(model, variables, seed=seed)
