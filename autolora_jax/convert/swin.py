"""timm Swin Transformer state dicts <-> this project's `models.Swin` (the mapping; the rest of
autolora_jax.convert reads the file, finds the prefix and the normaliser, and stores the result).

timm's current `swin_*_patch4_window7_224` keys (patch_embed.proj, patch_embed.norm, layers.I.downsample.
{norm,reduction} at the start of layers 1-3, layers.I.blocks.J.{norm1,attn.qkv,attn.proj,
attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}, norm, head.fc) map one to one onto Flax paths: '.'
becomes '/', a number joins the name before it ('layers.2' -> 'layers_2'), head.fc becomes 'head'; the
convolution goes from OIHW to HWIO, linear weights are transposed, a LayerNorm's weight becomes its scale,
the bias table stays as it is. The older timm layout (patch merging at the end of layers 0-2, head.weight)
is read too; the buffers relative_position_index and attn_mask are recomputed by the model, not read.
Depths, width, heads and window are read from the weights.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import numpy as np
from flax import traverse_util

from autolora_jax import models
from autolora_jax.convert.common import (
  converted_archs,
  map_weights,
  module_path,
  template,
  torch_layout,
  torch_modules,
  weight_path,
)
from autolora_jax.errors import CheckpointError

LABEL = 'Swin'
ANCHOR = 'layers.0.blocks.0.attn.relative_position_bias_table'
ANCHOR_NAME = "relative position bias table 'layers.0.blocks.0.attn.relative_position_bias_table'"
TABLE = 'relative_position_bias_table'
_BUFFERS = ('relative_position_index', 'attn_mask')
_NUMBERED = ('layers', 'blocks')


def current_keys(weights: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], list]:
  """(the state dict in timm's current layout, the buffers left out): an older layout's patch merging
  moved from the end of layer I to the start of layer I + 1 and its head.weight/bias renamed head.fc."""
  old = any(re.match(r'layers\.0\.downsample\.', k) for k in weights)
  out, buffers = {}, []
  for key, value in weights.items():
    if key.rsplit('.', 1)[-1] in _BUFFERS:
      buffers.append(key)
      continue
    if old:
      key = re.sub(r'^layers\.(\d)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)
    key = re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', key)
    out[key] = value
  return out, buffers


def flax_path(key: str, value: np.ndarray):
  """'params/<module path>/<leaf>' of a timm Swin key, or None for a key this model does not have."""
  parts = key.split('.')
  leaf, mods = parts[-1], parts[:-1]
  module = module_path(mods, _NUMBERED)
  module = 'head' if module == 'head/fc' else module
  if leaf == TABLE:
    return f'params/{module}/{TABLE}' if re.fullmatch(r'layers_\d+/blocks_\d+/attn', module) else None
  if leaf not in ('weight', 'bias') or not re.fullmatch(
      r'(patch_embed/(proj|norm)|layers_\d+/downsample/(norm|reduction)|layers_\d+/blocks_\d+/(norm1|norm2|'
      r'attn/(qkv|proj)|mlp/(fc1|fc2))|norm|head)', module):
    return None
  return weight_path(module, leaf, value)


def torch_key(path: str, stem: str = 'imagenet') -> str:
  """The timm key `flax_path` maps onto 'params/<module path>/<leaf>' (its inverse)."""
  del stem
  _, *mods, leaf = path.split('/')
  if mods == ['head']:
    mods = ['head', 'fc']
  return '.'.join(torch_modules(mods, _NUMBERED) + [{'bias': 'bias', TABLE: TABLE}.get(leaf, 'weight')])


def torch_value(path: str, value: np.ndarray) -> np.ndarray:
  """A leaf in PyTorch's layout: the bias table as it is, the rest as `common.torch_layout`."""
  return value if path.endswith(TABLE) else torch_layout(value)


def summary(weights: Dict[str, np.ndarray]) -> dict:
  """What a current-layout Swin state dict holds: depths, dim, heads, window, num_classes, a readable name."""
  blocks: Dict[int, set] = {}
  for key in weights:
    m = re.match(r'layers\.(\d)\.blocks\.(\d+)\.', key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  depths = tuple(len(blocks[i]) for i in sorted(blocks))
  proj = weights.get('patch_embed.proj.weight')
  dim = int(proj.shape[0]) if proj is not None and proj.ndim == 4 else 0
  patch = int(proj.shape[-1]) if proj is not None and proj.ndim == 4 else None
  table = weights.get(ANCHOR)
  heads = int(table.shape[1]) if table is not None and table.ndim == 2 else 0
  window = int(round((np.sqrt(table.shape[0]) + 1) / 2)) if table is not None and table.ndim == 2 else 0
  fc = weights.get('head.fc.weight')
  name = next((a for a, size in models.swin.SWIN_SIZES.items() if size == (depths, dim, heads)), None)
  if name is None:
    name = f'a Swin of depths {depths}, width {dim} and {heads} heads'
  if window != models.swin.WINDOW or patch != models.swin.PATCH_SIZE:
    name += f' with {patch}x{patch} patches and window {window}'
  return {'depths': depths, 'dim': dim, 'heads': heads, 'window': window, 'patch': patch, 'name': name,
          'num_classes': int(fc.shape[0]) if fc is not None and np.ndim(fc) == 2 else None}


def describe(weights: Dict[str, np.ndarray]) -> str:
  """A readable name of a Swin state dict: its --arch (e.g. 'swin_b') or its sizes."""
  return summary(current_keys(weights)[0])['name']


def convert_state_dict(weights: Dict[str, np.ndarray], arch: str, model_arch: str, stem: str,
                       source: str = 'the checkpoint') -> Tuple[dict, dict]:
  """Maps a prefix-free timm Swin state dict onto `models.Swin`.

  Returns:
    (variables {'params', 'batch_stats': {}} numpy float32, report with depths, dim, heads, window,
    num_classes and unused keys).
  Raises:
    CheckpointError naming what does not fit: another size (with the --arch to use), missing keys or shapes.
  """
  weights, _ = current_keys(weights)
  if ANCHOR not in weights:
    raise CheckpointError(f'{source} holds no Swin (no {ANCHOR}), but --arch={arch}.')
  info = summary(weights)
  want_depths, want_dim, want_heads = models.swin.SWIN_SIZES[model_arch]
  if info['num_classes'] is None:
    raise CheckpointError(f'{source} has no classifier weight head.fc.weight (or head.weight); the conversion '
                          'keeps the ImageNet head so that the converted model reproduces its logits.')
  if info['name'] != arch:
    hint = (f' Convert it with --arch={info["name"]}.' if info['name'] in _arch_names()
            else f' This project converts {", ".join(_arch_names())} (4x4 patches, window 7).')
    raise CheckpointError(f'{source} holds {info["name"]} (depths {info["depths"]}, width {info["dim"]}, '
                          f'{info["heads"]} heads), not a {arch} (depths {want_depths}, width {want_dim}, '
                          f'{want_heads} heads).' + hint)
  model = models.spec(model_arch).builder(info['num_classes'], lora_rank=0, stem=stem, input_size=224)
  shapes = template(model, 224)
  # to_flax would transpose the 2-D table: give it to map_weights pre-transposed (it transposes it back).
  weights = {k: (v.T if k.endswith(TABLE) else v) for k, v in weights.items()}
  flat, unused, mismatched, missing = map_weights(weights, shapes, flax_path, arch)
  if missing or mismatched:
    raise CheckpointError(
        f'{source} does not fit a {arch}: '
        + (f'shape mismatches: {"; ".join(mismatched[:4])}. ' if mismatched else '')
        + (f'missing: {", ".join(p.split("/", 1)[1] for p in missing[:6])}'
           f'{" ..." if len(missing) > 6 else ""}. ' if missing else '')
        + (f'unexpected: {", ".join(unused[:4])}{" ..." if len(unused) > 4 else ""}.' if unused else ''))
  params = traverse_util.unflatten_dict({tuple(p.split('/')[1:]): v for p, v in flat.items()})
  report = {'depths': list(info['depths']), 'dim': info['dim'], 'heads': info['heads'], 'window': info['window'],
            'num_classes': info['num_classes'], 'unused': unused}
  return {'params': params, 'batch_stats': {}}, report


def _arch_names():
  return tuple(converted_archs(__name__))


def meta(report: dict) -> dict:
  """The converted meta's Swin fields: width (= dim), depths, dim, heads, window and input_size 224."""
  return {'width': report['dim'], 'depths': report['depths'], 'dim': report['dim'], 'heads': report['heads'],
          'window': report['window'], 'input_size': 224}


def model_config(meta: dict) -> dict:
  """config.model fields of a converted Swin: input size 224 and config.model.swin's sizes."""
  return {'input_size': meta['input_size'],
          'swin': {'dim': meta['dim'], 'depths': tuple(meta['depths']), 'heads': meta['heads'],
                   'window': meta['window']}}


def export_fields(model, params) -> dict:
  """model.json's Swin fields: width (= dim), depths, dim, heads, window, input channels."""
  return {'width': int(model.dim), 'depths': [int(d) for d in model.depths], 'dim': int(model.dim),
          'heads': int(model.heads), 'window': int(model.window),
          'in_channels': int(np.shape(params['patch_embed']['proj']['kernel'])[2])}
