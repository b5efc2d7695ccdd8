"""ResNet state dicts <-> this project's `models.ResNet`: torchvision's keys (ImageNet stem), the common CIFAR
layout's (3x3 stride-1 stem, no max-pool, 'shortcut.0/1', head 'linear').

conv1 / bn1 / layerI.J.{convK,bnK} / layerI.J.{downsample,shortcut}.{0,1} / {fc,linear} map onto Flax paths
'conv1', 'bn1', 'layerI_J/convK', 'layerI_J/downsample_conv', 'layerI_J/downsample_bn', 'head'; BatchNorm
weight/bias become params scale/bias and running_mean/running_var batch_stats mean/var.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import numpy as np
from flax import traverse_util

from autolora_jax import models
from autolora_jax.convert.common import converted_archs, map_weights, template
from autolora_jax.errors import CheckpointError

LABEL = 'ResNet'
ANCHOR = 'conv1.weight'
ANCHOR_NAME = "stem convolution 'conv1.weight'"

_BN_LEAVES = {'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_DEPTHS = {('basic', (2, 2, 2, 2)): 'resnet18', ('basic', (3, 4, 6, 3)): 'resnet34',
           ('bottleneck', (3, 4, 6, 3)): 'resnet50', ('bottleneck', (3, 4, 23, 3)): 'resnet101',
           ('bottleneck', (3, 8, 36, 3)): 'resnet152'}


def flax_path(key: str, value: np.ndarray) -> Optional[Tuple[str, str]]:
  """(collection, 'module/.../leaf') of a torchvision-style key, or None if it is not a network weight.

  conv1 / bn1 / layerI.J.{convK,bnK} / layerI.J.{downsample,shortcut}.{0,1} / {fc,linear}; the leaf type is
  told by name and rank: 'weight' of rank 4 -> kernel, rank 2 -> kernel (head), rank 1 -> BN scale.
  """
  parts = key.split('.')
  leaf, mods = parts[-1], parts[:-1]
  if mods in (['conv1'], ['bn1']):
    module = mods[0]
  elif mods in (['fc'], ['linear']):
    module = 'head'
  elif (len(mods) in (3, 4) and re.fullmatch(r'layer\d', mods[0]) and mods[1].isdigit()):
    block = f'{mods[0]}_{mods[1]}'
    if len(mods) == 3 and re.fullmatch(r'(conv|bn)\d', mods[2]):
      module = f'{block}/{mods[2]}'
    elif len(mods) == 4 and mods[2] in ('downsample', 'shortcut') and mods[3] in ('0', '1'):
      module = f'{block}/' + ('downsample_conv' if mods[3] == '0' else 'downsample_bn')
    else:
      return None
  else:
    return None
  if leaf in _BN_LEAVES:
    collection, name = _BN_LEAVES[leaf]
    return collection, f'{module}/{name}'
  if leaf == 'weight':
    return 'params', f'{module}/' + ('kernel' if value.ndim in (2, 4) else 'scale')
  if leaf == 'bias':
    return 'params', f'{module}/bias'
  return None


def describe(weights: Dict[str, np.ndarray]) -> str:
  """A readable guess of a ResNet state dict's architecture, e.g. 'resnet50 (imagenet stem)'."""
  blocks: Dict[int, set] = {}
  for key in weights:
    m = re.match(r'layer(\d)\.(\d+)\.', key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  kind = 'bottleneck' if any('.conv3.' in k for k in weights) else 'basic'
  sizes = tuple(len(blocks[i]) for i in sorted(blocks))
  name = _DEPTHS.get((kind, sizes), f'a ResNet with {kind} blocks {sizes}')
  conv1 = weights.get('conv1.weight')
  stem = 'cifar' if conv1 is not None and conv1.shape[-1] == 3 else 'imagenet'
  return f'{name} ({stem} stem)'


def convert_state_dict(weights: Dict[str, np.ndarray], arch: str, model_arch: str, stem: str,
                       source: str = 'the checkpoint') -> Tuple[dict, dict]:
  """Maps a prefix-free ResNet state dict onto `models.ResNet` (--arch `arch`: `model_arch` with `stem`).

  Returns:
    (variables, report): variables {'params', 'batch_stats'} of the model without LoRa (FE and head,
    numpy float32); report['width'], report['num_classes'] and report['unused'] (keys not mapped).
  Raises:
    CheckpointError naming the first missing keys and mismatched shapes when the weights do not fit `arch`.
  """
  conv1 = weights.get(ANCHOR)
  if conv1 is None or conv1.ndim != 4:
    raise CheckpointError(f'{source} has no ResNet stem convolution conv1.weight.')
  head = weights.get('fc.weight', weights.get('linear.weight'))
  if head is None or head.ndim != 2:
    raise CheckpointError(f'{source} has no classifier weight (fc.weight or linear.weight); the conversion '
                          'keeps the ImageNet head so that the converted model reproduces its logits.')
  width, num_classes = int(conv1.shape[0]), int(head.shape[0])
  model = models.spec(model_arch).builder(num_classes, width=width, lora_rank=0, stem=stem, input_size=32)
  shapes = template(model, 32)

  def path_of(key, value):
    target = flax_path(key, value)
    return None if target is None else '/'.join(target)

  flat, unused, mismatched, missing = map_weights(weights, shapes, path_of, arch)
  if mismatched or missing:
    looks, archs = describe(weights), converted_archs(__name__)
    hint = next((f' It looks like {looks}: try --arch={a} (config.model.arch={archs[a][0]}, '
                 f'config.model.stem={archs[a][1]}).' for a in archs
                 if looks.startswith(archs[a][0] + ' (' + archs[a][1]) and a != arch),
                f' It looks like {looks}.')
    raise CheckpointError(
        f'{source} does not hold a {arch} (width {width}): '
        + (f'shape mismatches: {"; ".join(mismatched[:4])}{" ..." if len(mismatched) > 4 else ""}. '
           if mismatched else '')
        + (f'missing: {", ".join(torch_key(p) for p in missing[:6])}{" ..." if len(missing) > 6 else ""}. '
           if missing else '')
        + (f'unexpected: {", ".join(unused[:4])}{" ..." if len(unused) > 4 else ""}.' if unused else '')
        + hint)
  variables = {c: traverse_util.unflatten_dict(
      {tuple(p.split('/')[1:]): v for p, v in flat.items() if p.startswith(c + '/')})
      for c in ('params', 'batch_stats')}
  return variables, {'width': width, 'num_classes': num_classes, 'unused': unused}


def torch_key(path: str, stem: str = 'imagenet') -> str:
  """'params/layer1_0/downsample_bn/scale' -> 'layer1.0.downsample.1.weight': the key `flax_path` maps onto
  `path`, in torchvision's names (stem 'imagenet') or the CIFAR layout's ('shortcut', 'linear')."""
  collection, *mods, leaf = path.split('/')
  shortcut, head = ('shortcut', 'linear') if stem == 'cifar' else ('downsample', 'fc')
  names = []
  for m in mods:
    b = re.fullmatch(r'(layer\d)_(\d+)', m)
    names += [b.group(1), b.group(2)] if b else (
        [shortcut, '0'] if m == 'downsample_conv' else [shortcut, '1'] if m == 'downsample_bn'
        else [head] if m == 'head' else [m])
  leaf = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}.get(leaf, leaf)
  del collection
  return '.'.join(names + [leaf])


def meta(report: dict) -> dict:
  """The converted meta's ResNet field: its width (first-stage channels)."""
  return {'width': report['width']}


def model_config(meta: dict) -> dict:
  """config.model fields of a converted ResNet: its width, and input size 224 (ImageNet stem) or 32 (CIFAR)."""
  return {'width': meta['width'], 'input_size': 224 if meta['stem'] == 'imagenet' else 32}


def export_fields(model, params) -> dict:
  """model.json's ResNet fields: width and input channels."""
  return {'width': int(model.width), 'in_channels': int(np.shape(params['conv1']['kernel'])[2])}
