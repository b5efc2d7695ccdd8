"""timm ViT state dicts <-> this project's `models.ViT` (the mapping; the rest of autolora_jax.convert reads
the file, finds the prefix and the normaliser, and stores the result).

timm's `vit_small_patch16_224` / `vit_base_patch16_224` keys (patch_embed.proj, cls_token, pos_embed,
blocks.N.norm1, blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.norm2, blocks.N.mlp.fc1, blocks.N.mlp.fc2,
norm, head) and the ConvStem's (patch_embed.proj.stem.{0,3,6,9,12} convolutions, stem.{1,4,7,10}
LayerNorms) map one to one onto Flax paths: '.' becomes '/', 'blocks.N' becomes 'blocks_N' and 'stem.K'
'stem_K'; conv weights go from OIHW to HWIO, linear weights are transposed, a LayerNorm's weight becomes
its scale. The embedding width and the number of blocks are read from the weights, the heads are the
architecture's (64 per head); the patch grid of the position embedding gives the checkpoint's own input
size, and a model of another input size gets it resampled (`models.resample_pos_embed`).
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import numpy as np
from flax import traverse_util

from autolora_jax import models
from autolora_jax.convert.common import converted_archs, map_weights, module_path, template, torch_modules, weight_path
from autolora_jax.errors import CheckpointError

LABEL = 'ViT'
ANCHOR = 'cls_token'  # the key that marks a ViT state dict (and its prefix)
ANCHOR_NAME = "class token 'cls_token'"
_NUMBERED = ('blocks', 'stem')


def flax_path(key: str, value: np.ndarray):
  """'params/<module path>/<leaf>' of a timm ViT key, or None for a key this model does not have."""
  parts = key.split('.')
  if parts in (['cls_token'], ['pos_embed']):
    return 'params/' + parts[0]
  leaf, mods = parts[-1], parts[:-1]
  if leaf not in ('weight', 'bias') or not mods:
    return None
  module = module_path(mods, _NUMBERED)
  if not re.fullmatch(r'(patch_embed/proj(/stem_\d+)?|blocks_\d+/(norm1|norm2|attn/(qkv|proj)|mlp/(fc1|fc2))'
                      r'|norm|head)', module):
    return None
  return weight_path(module, leaf, value)


def torch_key(path: str, stem: str = 'imagenet') -> str:
  """The timm key `flax_path` maps onto 'params/<module path>/<leaf>' (its inverse; either stem)."""
  del stem
  _, *mods, leaf = path.split('/')
  if not mods:
    return leaf  # cls_token, pos_embed
  return '.'.join(torch_modules(mods, _NUMBERED) + ['bias' if leaf == 'bias' else 'weight'])


def describe(weights: Dict[str, np.ndarray]) -> str:
  """A readable name of a ViT state dict: its --arch (e.g. 'vit_s16_convstem') or its sizes."""
  return summary(weights)['name']


def summary(weights: Dict[str, np.ndarray]) -> dict:
  """What a ViT state dict holds: dim, depth, patch (or 'convstem'), grid, num_classes, a readable name."""
  cls = weights.get('cls_token')
  dim = int(cls.shape[-1]) if cls is not None else 0
  depth = len({m.group(1) for k in weights for m in [re.match(r'blocks\.(\d+)\.', k)] if m})
  convstem = any(k.startswith('patch_embed.proj.stem.') for k in weights)
  proj = weights.get('patch_embed.proj.weight')
  patch = 'convstem' if convstem else (int(proj.shape[-1]) if proj is not None and proj.ndim == 4 else None)
  pos = weights.get('pos_embed')
  grid = int(round(np.sqrt(pos.shape[1] - 1))) if pos is not None and pos.ndim == 3 else None
  head = weights.get('head.weight')
  sizes = {(d, n): a for a, (d, n, _) in models.VIT_SIZES.items()}
  name = sizes.get((dim, depth), f'a ViT of width {dim} with {depth} blocks')
  if patch == 'convstem':
    name += '_convstem' if (dim, depth) in sizes else ' with a ConvStem'
  elif patch not in (None, models.vit.PATCH_SIZE):
    name += f' with {patch}x{patch} patches'
  return {'dim': dim, 'depth': depth, 'patch': patch, 'grid': grid, 'name': name,
          'num_classes': int(head.shape[0]) if head is not None and head.ndim == 2 else None}


def convert_state_dict(weights: Dict[str, np.ndarray], arch: str, model_arch: str, stem: str,
                       source: str = 'the checkpoint') -> Tuple[dict, dict]:
  """Maps a prefix-free timm ViT state dict onto `models.ViT`.

  Returns:
    (variables {'params', 'batch_stats': {}} numpy float32, report with dim, depth, heads, num_classes,
    input_size (the checkpoint's own: its position grid * 16) and unused keys).
  Raises:
    CheckpointError naming what does not fit: another width or depth (with the --arch to use), another
    patch size or stem, missing keys or shapes.
  """
  if ANCHOR not in weights:
    raise CheckpointError(f'{source} holds no ViT (no cls_token), but --arch={arch}.')
  info = summary(weights)
  want_dim, want_depth, heads = models.VIT_SIZES[model_arch]
  if info['num_classes'] is None:
    raise CheckpointError(f'{source} has no classifier weight head.weight; the conversion keeps the ImageNet '
                          'head so that the converted model reproduces its logits.')
  if info['grid'] is None:
    raise CheckpointError(f'{source} has no position embedding pos_embed of shape (1, 1 + grid * grid, dim).')
  want_patch = 'convstem' if stem == 'convstem' else models.vit.PATCH_SIZE
  if (info['dim'], info['depth'], info['patch']) != (want_dim, want_depth, want_patch):
    hint = (f' Convert it with --arch={info["name"]}.' if info['name'] in _arch_names()
            else ' This project converts ViT-S/16 and ViT-B/16, with the patch embedding or the ConvStem '
                 f'({", ".join(_arch_names())}).')
    has = 'a ConvStem' if info['patch'] == 'convstem' else f'patch {info["patch"]}'
    wants = 'a ConvStem' if want_patch == 'convstem' else f'patch {want_patch}'
    raise CheckpointError(f'{source} holds {info["name"]} (width {info["dim"]}, {info["depth"]} blocks, {has}), '
                          f'not a {arch} (width {want_dim}, {want_depth} blocks, {wants}).' + hint)
  size = info['grid'] * models.vit.PATCH_SIZE
  model = models.spec(model_arch).builder(info['num_classes'], dim=info['dim'], depth=info['depth'], lora_rank=0,
                                          stem=stem, input_size=size)
  flat, unused, mismatched, missing = map_weights(weights, template(model, size), flax_path, arch)
  if missing or mismatched:
    raise CheckpointError(
        f'{source} does not fit a {arch}: '
        + (f'shape mismatches: {"; ".join(mismatched[:4])}. ' if mismatched else '')
        + (f'missing: {", ".join(p.split("/", 1)[1] for p in missing[:6])}'
           f'{" ..." if len(missing) > 6 else ""}. ' if missing else '')
        + (f'unexpected: {", ".join(unused[:4])}{" ..." if len(unused) > 4 else ""}.' if unused else ''))
  params = traverse_util.unflatten_dict({tuple(p.split('/')[1:]): v for p, v in flat.items()})
  report = {'dim': info['dim'], 'depth': info['depth'], 'heads': heads, 'num_classes': info['num_classes'],
            'input_size': info['grid'] * models.vit.PATCH_SIZE, 'unused': unused}
  return {'params': params, 'batch_stats': {}}, report


def _arch_names():
  return tuple(converted_archs(__name__))


def meta(report: dict) -> dict:
  """The converted meta's ViT fields: width (= dim), dim, depth, heads and input_size (its position grid's)."""
  return {'width': report['dim'], 'dim': report['dim'], 'depth': report['depth'], 'heads': report['heads'],
          'input_size': report['input_size']}


def model_config(meta: dict) -> dict:
  """config.model fields of a converted ViT: its input size and config.model.vit's dim, depth, heads."""
  return {'input_size': meta['input_size'],
          'vit': {'dim': meta['dim'], 'depth': meta['depth'], 'heads': meta['heads']}}


def export_fields(model, params) -> dict:
  """model.json's ViT fields: width (= dim), dim, depth, heads, patch size, MLP ratio, input channels."""
  proj = params['patch_embed']['proj']
  first = proj['stem_0']['kernel'] if 'stem_0' in proj else proj['kernel']
  return {'width': int(model.dim), 'dim': int(model.dim), 'depth': int(model.depth), 'heads': int(model.heads),
          'patch_size': int(model.patch_size), 'mlp_ratio': int(model.mlp_ratio),
          'in_channels': int(np.shape(first)[2])}
