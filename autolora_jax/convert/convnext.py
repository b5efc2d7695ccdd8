"""timm ConvNeXt state dicts <-> this project's `models.ConvNeXt` (the mapping; the rest of
autolora_jax.convert reads the file, finds the prefix and the normaliser, and stores the result).

timm's `convnext_*` keys (stem.0 convolution, stem.1 LayerNorm, stages.I.downsample.{0,1},
stages.I.blocks.J.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}, head.norm, head.fc) and Singh et al.'s ConvStem
(stem.stem.{0,3,6} convolutions, stem.stem.{1,4,7} LayerNorms) map one to one onto Flax paths: '.' becomes
'/', a number joins the name before it ('stages.2' -> 'stages_2'), head.norm becomes 'head_norm' and
head.fc 'head'; conv weights go from OIHW to HWIO, linear weights are transposed, a LayerNorm's weight
becomes its scale. The original ConvNeXt code's keys (downsample_layers, stages.I.J.dwconv, pwconv1,
pwconv2, norm, head) are renamed to timm's first. Depths and widths are read from the weights.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import numpy as np
from flax import traverse_util

from autolora_jax import models
from autolora_jax.convert.common import converted_archs, map_weights, module_path, template, torch_modules, weight_path
from autolora_jax.errors import CheckpointError

LABEL = 'ConvNeXt'
ANCHOR = 'stages.0.blocks.0.conv_dw.weight'  # the key that marks a ConvNeXt state dict (and its prefix)
ANCHORS = (ANCHOR, 'stages.0.0.dwconv.weight')  # timm's layout, the original code's
ANCHOR_NAME = "depthwise convolution 'stages.0.blocks.0.conv_dw.weight'"
_NUMBERED = ('stem', 'stages', 'blocks', 'downsample')


def timm_keys(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """A state dict in timm's ConvNeXt layout: the original code's keys renamed, others as they are."""
  if 'stages.0.0.dwconv.weight' not in weights:
    return weights
  out = {}
  for key, value in weights.items():
    new = re.sub(r'^downsample_layers\.0\.', 'stem.', key)
    new = re.sub(r'^downsample_layers\.(\d)\.', r'stages.\1.downsample.', new)
    new = re.sub(r'^stages\.(\d)\.(\d+)\.', r'stages.\1.blocks.\2.', new)
    new = new.replace('.dwconv.', '.conv_dw.').replace('.pwconv1.', '.mlp.fc1.').replace('.pwconv2.', '.mlp.fc2.')
    new = re.sub(r'^norm\.', 'head.norm.', new)
    new = re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', new)
    out[new] = value
  return out


def flax_path(key: str, value: np.ndarray):
  """'params/<module path>/<leaf>' of a timm ConvNeXt key, or None for a key this model does not have."""
  parts = key.split('.')
  leaf, mods = parts[-1], parts[:-1]
  if not mods or leaf not in ('weight', 'bias', 'gamma'):
    return None
  module = module_path(mods, _NUMBERED)
  module = {'head/norm': 'head_norm', 'head/fc': 'head'}.get(module, module)
  if leaf == 'gamma':
    return f'params/{module}/gamma' if re.fullmatch(r'stages_\d+/blocks_\d+', module) else None
  if not re.fullmatch(r'(stem_[01]|stem/stem_\d+|stages_\d+/downsample_[01]|stages_\d+/blocks_\d+/(conv_dw|norm|'
                      r'mlp/fc1|mlp/fc2)|head_norm|head)', module):
    return None
  return weight_path(module, leaf, value)


def torch_key(path: str, stem: str = 'imagenet') -> str:
  """The timm key `flax_path` maps onto 'params/<module path>/<leaf>' (its inverse; either stem)."""
  del stem
  _, *mods, leaf = path.split('/')
  if mods == ['head_norm']:
    mods = ['head', 'norm']
  elif mods == ['head']:
    mods = ['head', 'fc']
  return '.'.join(torch_modules(mods, _NUMBERED) + [{'bias': 'bias', 'gamma': 'gamma'}.get(leaf, 'weight')])


def summary(weights: Dict[str, np.ndarray]) -> dict:
  """What a timm-layout ConvNeXt state dict holds: depths, dims, stem ('imagenet' or 'convstem' with its
  number of convolutions), num_classes and a readable name (its --arch where it is one)."""
  blocks: Dict[int, set] = {}
  for key in weights:
    m = re.match(r'stages\.(\d)\.blocks\.(\d+)\.', key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  depths = tuple(len(blocks[i]) for i in sorted(blocks))
  dims = tuple(int(np.shape(weights[f'stages.{i}.blocks.0.conv_dw.weight'])[0]) for i in sorted(blocks)
               if f'stages.{i}.blocks.0.conv_dw.weight' in weights)
  convs = len({k.split('.')[2] for k in weights if re.match(r'stem\.stem\.\d+\.weight$', k)
               and np.ndim(weights[k]) == 4})
  stem = 'convstem' if convs else 'imagenet'
  fc = weights.get('head.fc.weight')
  name = next((a for a, (d, w, _) in models.convnext.CONVNEXT_SIZES.items() if (d, w) == (depths, dims)), None)
  layout = models.convnext.CONVNEXT_SIZES[name][2] if name else None
  if name is None:
    name = f'a ConvNeXt of depths {depths} and widths {dims}'
    name += ' with a ConvStem' if convs else ''
  elif convs:
    name = f'{name}_convstem' if {'two': 2, 'three': 3}[layout] == convs else f'{name} with a {convs}-layer ConvStem'
  return {'depths': depths, 'dims': dims, 'stem': stem, 'stem_convs': convs, 'name': name,
          'num_classes': int(fc.shape[0]) if fc is not None and np.ndim(fc) == 2 else None}


def describe(weights: Dict[str, np.ndarray]) -> str:
  """A readable name of a ConvNeXt state dict: its --arch (e.g. 'convnext_b_convstem') or its sizes."""
  return summary(timm_keys(weights))['name']


def convert_state_dict(weights: Dict[str, np.ndarray], arch: str, model_arch: str, stem: str,
                       source: str = 'the checkpoint') -> Tuple[dict, dict]:
  """Maps a prefix-free timm (or original-code) ConvNeXt state dict onto `models.ConvNeXt`.

  Returns:
    (variables {'params', 'batch_stats': {}} numpy float32, report with depths, dims, num_classes and unused
    keys).
  Raises:
    CheckpointError naming what does not fit: another size or stem (with the --arch to use), missing keys or
    shapes.
  """
  weights = timm_keys(weights)
  if ANCHOR not in weights:
    raise CheckpointError(f'{source} holds no ConvNeXt (no {ANCHOR}), but --arch={arch}.')
  info = summary(weights)
  want_depths, want_dims, _ = models.convnext.CONVNEXT_SIZES[model_arch]
  if info['num_classes'] is None:
    raise CheckpointError(f'{source} has no classifier weight head.fc.weight; the conversion keeps the ImageNet '
                          'head so that the converted model reproduces its logits.')
  if info['name'] != arch:
    hint = (f' Convert it with --arch={info["name"]}.' if info['name'] in _arch_names()
            else f' This project converts {", ".join(_arch_names())}.')
    raise CheckpointError(f'{source} holds {info["name"]} (depths {info["depths"]}, widths {info["dims"]}, '
                          f'{"a ConvStem" if info["stem"] == "convstem" else "the patchify stem"}), not a {arch} '
                          f'(depths {want_depths}, widths {want_dims}, '
                          f'{"a ConvStem" if stem == "convstem" else "the patchify stem"}).' + hint)
  model = models.spec(model_arch).builder(info['num_classes'], lora_rank=0, stem=stem, input_size=32)
  flat, unused, mismatched, missing = map_weights(weights, template(model, 32), flax_path, arch)
  if missing or mismatched:
    raise CheckpointError(
        f'{source} does not fit a {arch}: '
        + (f'shape mismatches: {"; ".join(mismatched[:4])}. ' if mismatched else '')
        + (f'missing: {", ".join(p.split("/", 1)[1] for p in missing[:6])}'
           f'{" ..." if len(missing) > 6 else ""}. ' if missing else '')
        + (f'unexpected: {", ".join(unused[:4])}{" ..." if len(unused) > 4 else ""}.' if unused else ''))
  params = traverse_util.unflatten_dict({tuple(p.split('/')[1:]): v for p, v in flat.items()})
  report = {'depths': list(info['depths']), 'dims': list(info['dims']), 'num_classes': info['num_classes'],
            'unused': unused}
  return {'params': params, 'batch_stats': {}}, report


def _arch_names():
  return tuple(converted_archs(__name__))


def meta(report: dict) -> dict:
  """The converted meta's ConvNeXt fields: width (the first stage's), depths, dims, input_size 224."""
  return {'width': report['dims'][0], 'depths': report['depths'], 'dims': report['dims'], 'input_size': 224}


def model_config(meta: dict) -> dict:
  """config.model fields of a converted ConvNeXt: input size 224 and config.model.convnext's sizes."""
  return {'input_size': meta['input_size'],
          'convnext': {'dim': meta['dims'][0], 'depths': tuple(meta['depths'])}}


def export_fields(model, params) -> dict:
  """model.json's ConvNeXt fields: width, depths, dims, the ConvStem's layout, input channels."""
  first = params['stem']['stem_0']['kernel'] if 'stem' in params else params['stem_0']['kernel']
  return {'width': int(model.dims[0]), 'depths': [int(d) for d in model.depths], 'dims': [int(d) for d in model.dims],
          'convstem_layout': str(model.convstem_layout), 'in_channels': int(np.shape(first)[2])}
