"""PyTorch checkpoints -> this project's models: the robust ImageNet ResNets the paper uses, and ViTs.

Reads a PyTorch file (.ckpt/.pt/.pth: torch is needed only for this, to unpickle it) or a .safetensors file
(no torch; bfloat16 and float16 weights become float32), also as a file of a Hugging Face hub repository,
hf://ORG/REPO/PATH[@REVISION] (autolora_jax.hub: downloaded into huggingface_hub's cache), holding:

* robustness-library checkpoints (e.g. resnet18_linf_eps4.0.ckpt, resnet50_linf_eps4.0.ckpt): a dict with the
  state dict under 'model' or 'state_dict', keys 'module.model.<torchvision key>', a duplicate set under
  'module.attacker.model.' (ignored) and the input normaliser 'module.normalizer.new_mean/new_std';
* plain torchvision state dicts, also with a 'model.' or 'module.' prefix;
* the common CIFAR layout (3x3 stride-1 stem, no max-pool, blocks with 'shortcut.0/1', head 'linear');
* timm ViT-S/16 and ViT-B/16 state dicts and their ConvStem variant (autolora_jax.convert_vit), also under
  RobustBench's or ARES's wrappers: a normalisation module in front ('normalize.mean/std'), 'model.' or
  'module.' prefixes.

Convolution kernels go from OIHW to HWIO, the linear head is transposed, BatchNorm weight/bias become params
scale/bias and running_mean/running_var become batch_stats mean/var. The ImageNet head is kept, so that a
converted model reproduces the checkpoint's logits; fine-tuning replaces it (`pretrain.transplant`).

The input normalisation a checkpoint expects (its normaliser, the ImageNet statistics, none, or a given
mean/std) travels with the converted weights and is applied inside the model (`models.ResNet.mean/std`).

    python -m autolora_jax.convert --src=resnet18_linf_eps4.0.ckpt --dst=pretrained/resnet18_linf_eps4.0 \
        --arch=resnet18

writes an Orbax checkpoint (items 'variables' and 'meta') that `config.pretrained=DIR` loads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from autolora_jax import convert_vit, hub, models, ops
from autolora_jax.errors import CheckpointError, DamagedCheckpointError

log = logging.getLogger(__name__)

# --arch -> (models.ARCHITECTURES key, stem).
ARCHS = {'resnet18': ('resnet18', 'imagenet'), 'resnet50': ('resnet50', 'imagenet'),
         'resnet18_cifar': ('resnet18', 'cifar'), 'resnet50_cifar': ('resnet50', 'cifar'),
         'vit_s16': ('vit_s16', 'imagenet'),
         'vit_b16': ('vit_b16', 'imagenet'), 'vit_s16_convstem': ('vit_s16', 'convstem'),
         'vit_b16_convstem': ('vit_b16', 'convstem')}
NORMALIZATIONS = ('auto', 'checkpoint', 'imagenet', 'none')
TORCH_INSTALL = 'pip install torch --index-url https://download.pytorch.org/whl/cpu'
SAFETENSORS_INSTALL = "pip install 'safetensors>=0.4,<1'"
FORMAT_VERSION = 1

# Where the network sits in a state dict: the robustness library's 'module.model.', RobustBench's and
# Singh et al.'s nn.Sequential(normalize, model) 'model.', DataParallel's 'module.', a bare nn.Sequential's
# '1.', or nothing.
_PREFIXES = ('module.model.', 'model.', 'module.1.', 'module.', '1.', '')
# The input normaliser in front of it: the robustness library's normalizer.new_mean/new_std, RobustBench's
# normalize.mean/std (ImageNormalizer buffers of shape (1, 3, 1, 1)), or a bare nn.Sequential's 0.mean/std.
_NORMALIZER = re.compile(r'(^|\.)(normalizer\.new_|normalizer\.|normalize\.|^0\.|module\.0\.)(?P<stat>mean|std)$')
_BN_LEAVES = {'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_DEPTHS = {('basic', (2, 2, 2, 2)): 'resnet18', ('basic', (3, 4, 6, 3)): 'resnet34',
           ('bottleneck', (3, 4, 6, 3)): 'resnet50', ('bottleneck', (3, 4, 23, 3)): 'resnet101',
           ('bottleneck', (3, 8, 36, 3)): 'resnet152'}

Normalization = Union[str, Tuple[Sequence[float], Sequence[float]]]


def arch_for(model_arch: str, stem: str) -> str:
  """The --arch name of a model config: ('resnet18', 'cifar') -> 'resnet18_cifar'."""
  return model_arch if stem == 'imagenet' else f'{model_arch}_{stem}'


def _check_arch(arch: str) -> Tuple[str, str]:
  if arch not in ARCHS:
    raise CheckpointError(f'Unknown architecture {arch!r} for conversion: choose one of {tuple(ARCHS)}.')
  return ARCHS[arch]


# ----------------------------------------------------------------------------------------------------------
# Reading the PyTorch file
# ----------------------------------------------------------------------------------------------------------

def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        'Reading a PyTorch checkpoint needs PyTorch, which is not installed (it is an optional dependency, '
        f'used only to unpickle the file). Install it with `{TORCH_INSTALL}`, or convert the checkpoint on a '
        'machine that has it (python -m autolora_jax.convert --src=FILE --dst=DIR --arch=...) and pass '
        'config.pretrained=DIR.') from None
  return torch


def _to_numpy(value) -> np.ndarray:
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.float()
  return value.numpy()


def is_safetensors(path: str) -> bool:
  """Whether `path` (a local path or a hub path) names a safetensors file (by its .safetensors suffix)."""
  return str(path).lower().endswith('.safetensors')


def read_state_dict(path: str, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """The state dict of a PyTorch or safetensors checkpoint file as numpy arrays, keys as stored.

  Floating-point tensors become float32 (also bfloat16 and float16 ones), others keep their type. `path`
  may be a hub path, hf://ORG/REPO/PATH[@REVISION] (`hub.resolve`). A .safetensors file is read with
  safetensors.numpy (no torch, no code from the file). A PyTorch file may hold a bare state dict or a dict
  holding it under 'model' or 'state_dict'; with allow_pickle=False (the default) it is read with
  torch.load(weights_only=True), which runs no code from the file.
  """
  if hub.is_hub_path(path):
    path = hub.resolve(path)
  if not os.path.exists(path):
    raise CheckpointError(f'The checkpoint {path} does not exist. Download it (see README.md, "Getting the robust '
                          'ImageNet checkpoints") and pass its path, or leave config.pretrained empty for a random '
                          'initialisation.')
  if os.path.isdir(path):
    raise CheckpointError(f'{path} is a folder, not a PyTorch checkpoint file.')
  if is_safetensors(path):
    return _read_safetensors(path)
  torch = _import_torch()
  import pickle  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except pickle.UnpicklingError as e:
    if 'weights only' in str(e).lower() or 'weights_only' in str(e):
      raise CheckpointError(
          f'{path} holds Python objects besides tensors, which are not read by default because unpickling them '
          'runs code from the file. If you trust the file, convert it with `python -m autolora_jax.convert '
          f'--src={path} --dst=DIR --arch=... --allow_pickle` and pass config.pretrained=DIR.') from None
    raise CheckpointError(f'{path} is not a PyTorch checkpoint (torch.load failed: {e}).') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path} is not a PyTorch checkpoint (torch.load failed: '
                          f'{type(e).__name__}: {str(e)[:200]}).') from None
  if hasattr(obj, 'state_dict') and not isinstance(obj, dict):  # a pickled nn.Module (allow_pickle only)
    obj = obj.state_dict()
  if isinstance(obj, dict):
    for key in ('model', 'state_dict'):
      inner = obj.get(key)
      if hasattr(inner, 'state_dict') and not isinstance(inner, dict):
        inner = inner.state_dict()
      if isinstance(inner, dict) and any(torch.is_tensor(v) for v in inner.values()):
        obj = inner
        break
  if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
    what = f'a dict with keys {sorted(obj)[:8]}' if isinstance(obj, dict) else f'a {type(obj).__name__}'
    raise CheckpointError(f'{path} is a PyTorch file but holds no state dict ({what}); expected a state dict, '
                          "or a dict with one under 'model' or 'state_dict'.")
  return {k: _to_numpy(v) for k, v in obj.items() if torch.is_tensor(v)}


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """A .safetensors file's tensors as numpy arrays, floats as float32 (as `_to_numpy` gives them)."""
  try:
    import ml_dtypes  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import (names bfloat16 for numpy)
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'Reading {path} needs the safetensors package, which is not installed: '
                          f'{SAFETENSORS_INSTALL}.') from None
  try:
    state = safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except (SafetensorError, an unknown dtype, a read error)
    with open(path, 'rb') as f:
      head = f.read(4)
    hint = (' Its first bytes are those of a PyTorch file (zip or pickle): name it .pt, which is read with '
            'torch.' if head.startswith(b'PK\x03\x04') or head[:1] == b'\x80' else
            ' It may be damaged or cut short: download it again.')
    raise CheckpointError(f'{path} is not a readable safetensors file (safetensors failed: {type(e).__name__}: '
                          f'{str(e)[:200]}).{hint}') from None
  if not state:
    raise CheckpointError(f'{path} is a safetensors file without tensors; expected a state dict.')
  return {k: np.array(v, np.float32 if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype)
          for k, v in state.items()}


def split_state_dict(state: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], dict]:
  """Finds the network's keys in a state dict and strips their prefix.

  Returns:
    (weights keyed by torchvision-style names, info) with info['layout'] ('robustness', 'prefixed' or
    'plain'), info['prefix'], info['normalizer'] ((mean, std) lists or None), info['ignored'] (keys
    deliberately not used: the attacker's duplicate, the normaliser) and info['unused'] (other keys that do
    not belong to the network).
  """
  prefix = None
  for candidate in _PREFIXES:
    if candidate + 'conv1.weight' in state or candidate + convert_vit.ANCHOR in state:
      prefix = candidate
      break
  if prefix is None:
    raise CheckpointError(
        "The state dict holds neither a ResNet nor a ViT: no stem convolution 'conv1.weight' and no class token "
        f"'cls_token' under any of the prefixes {', '.join(repr(p) for p in _PREFIXES[:-1])} or none. Its first "
        f'keys are {sorted(state)[:6]}.')
  weights, ignored, unused = {}, [], []
  normalizer = {}
  for key, value in state.items():
    found = _NORMALIZER.search(key)
    if found and np.size(value) == 3:
      if 'attacker' not in key:
        normalizer[found.group('stat')] = [float(v) for v in np.ravel(value)]
      ignored.append(key)
    elif key.startswith(prefix):
      weights[key[len(prefix):]] = value
    elif key.startswith('module.attacker.'):
      ignored.append(key)
    else:
      unused.append(key)
  if prefix == 'module.model.':
    for key, value in weights.items():  # the robustness library's attacker holds the same module
      twin = state.get('module.attacker.model.' + key)
      if twin is not None and (twin.shape != value.shape or not np.array_equal(twin, value)):
        log.warning('The checkpoint\'s attacker copy of %s differs from module.model.%s; using the latter.',
                    key, key)
  layout = 'robustness' if prefix == 'module.model.' else ('prefixed' if prefix else 'plain')
  if normalizer and set(normalizer) != {'mean', 'std'}:
    raise CheckpointError(f'The checkpoint has an incomplete input normaliser ({sorted(normalizer)} only).')
  info = {'layout': layout, 'prefix': prefix,
          'normalizer': (normalizer['mean'], normalizer['std']) if normalizer else None,
          'ignored': sorted(ignored), 'unused': sorted(unused)}
  return weights, info


# ----------------------------------------------------------------------------------------------------------
# Mapping names and layouts
# ----------------------------------------------------------------------------------------------------------

def flax_path(torch_key: str, value: np.ndarray) -> Optional[Tuple[str, str]]:
  """(collection, 'module/.../leaf') of a torchvision-style key, or None if it is not a network weight.

  conv1 / bn1 / layerI.J.{convK,bnK} / layerI.J.{downsample,shortcut}.{0,1} / {fc,linear}; the leaf type is
  told by name and rank: 'weight' of rank 4 -> kernel, rank 2 -> kernel (head), rank 1 -> BN scale.
  """
  parts = torch_key.split('.')
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


def guess_arch(weights: Dict[str, np.ndarray]) -> str:
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


def _template(model_arch: str, stem: str, width: int, num_classes: int) -> Dict[str, Tuple[int, ...]]:
  """{'params/...': shape, 'batch_stats/...': shape} of the model without LoRa (no computation)."""
  model = models.ARCHITECTURES[model_arch](num_classes, width=width, lora_rank=0, stem=stem, input_size=32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}


def convert_state_dict(weights: Dict[str, np.ndarray], arch: str, source: str = 'the checkpoint'):
  """Maps a prefix-free ResNet state dict onto the project's model.

  Returns:
    (variables, report): variables {'params', 'batch_stats'} of the model without LoRa (FE and head,
    numpy float32); report['width'], report['num_classes'] and report['unused'] (keys not mapped).
  Raises:
    CheckpointError naming the first missing keys and mismatched shapes when the weights do not fit `arch`.
  """
  model_arch, stem = _check_arch(arch)
  if models.is_vit(model_arch):
    if convert_vit.ANCHOR not in weights:
      raise CheckpointError(f'{source} holds no ViT (no cls_token), but --arch={arch}; it looks like '
                            f'{guess_arch(weights)}.')
    return convert_vit.convert_state_dict(weights, arch, model_arch, stem, source)
  conv1 = weights.get('conv1.weight')
  if conv1 is None and convert_vit.ANCHOR in weights:
    name = convert_vit.describe(weights)['name']
    raise CheckpointError(f'{source} holds a ViT ({name}), not a {arch}: convert it with --arch={name}.')
  if conv1 is None or conv1.ndim != 4:
    raise CheckpointError(f'{source} has no ResNet stem convolution conv1.weight.')
  head = weights.get('fc.weight', weights.get('linear.weight'))
  if head is None or head.ndim != 2:
    raise CheckpointError(f'{source} has no classifier weight (fc.weight or linear.weight); the conversion '
                          'keeps the ImageNet head so that the converted model reproduces its logits.')
  width, num_classes = int(conv1.shape[0]), int(head.shape[0])
  template = _template(model_arch, stem, width, num_classes)

  def path_of(key, value):
    target = flax_path(key, value)
    return None if target is None else '/'.join(target)

  flat, unused, mismatched, missing = map_weights(weights, template, path_of, arch)
  if mismatched or missing:
    looks = guess_arch(weights)
    hint = next((f' It looks like {looks}: try --arch={a} (config.model.arch={ARCHS[a][0]}, '
                 f'config.model.stem={ARCHS[a][1]}).' for a in ARCHS
                 if looks.startswith(ARCHS[a][0] + ' (' + ARCHS[a][1]) and a != arch),
                f' It looks like {looks}.')
    raise CheckpointError(
        f'{source} does not hold a {arch} (width {width}): '
        + (f'shape mismatches: {"; ".join(mismatched[:4])}{" ..." if len(mismatched) > 4 else ""}. '
           if mismatched else '')
        + (f'missing: {", ".join(_torch_name(p) for p in missing[:6])}{" ..." if len(missing) > 6 else ""}. '
           if missing else '')
        + (f'unexpected: {", ".join(unused[:4])}{" ..." if len(unused) > 4 else ""}.' if unused else '')
        + hint)
  variables = {c: traverse_util.unflatten_dict(
      {tuple(p.split('/')[1:]): v for p, v in flat.items() if p.startswith(c + '/')})
      for c in ('params', 'batch_stats')}
  return variables, {'width': width, 'num_classes': num_classes, 'unused': unused}


def map_weights(weights: Dict[str, np.ndarray], template: Dict[str, Tuple[int, ...]], path_of, arch: str):
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
    if path is None or path not in template:
      unused.append(key)
      continue
    converted = to_flax(value)
    if tuple(converted.shape) != template[path]:
      mismatched.append(f'{key} has shape {tuple(value.shape)}, {arch} expects {torch_shape(template[path])}')
      mismatched_paths.add(path)
      continue
    flat[path] = converted.astype(np.float32)
  missing = [p for p in template if p not in flat and p not in mismatched_paths]
  return flat, unused, mismatched, missing


def _torch_name(path: str, stem: str = 'imagenet') -> str:
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
  model_arch, stem = _check_arch(arch)
  state = {}
  for path, value in deployed_paths(variables):
    if models.is_vit(model_arch):
      key = convert_vit.torch_key(path)
    else:
      key = _torch_name(path, stem)
    value = np.asarray(value, np.float32)
    state[key] = np.ascontiguousarray(torch_layout(value))
    if key.endswith('.running_var'):
      state[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return state


def torch_layout(value: np.ndarray) -> np.ndarray:
  """HWIO kernel -> OIHW weight; (in, out) kernel -> (out, in); the rest unchanged (inverse of `to_flax`)."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T
  return value


def resolve_normalization(normalization: Normalization, checkpoint_normalizer, arch: str):
  """(mean, std, how) the converted model applies; mean/std are tuples or None (no normalisation).

  'auto': the checkpoint's normaliser if it has one, else the ImageNet statistics for ImageNet-stem
  architectures and ViTs and none for the CIFAR layout; 'checkpoint': its normaliser (an error if it has none);
  'imagenet'; 'none'; or an explicit (mean, std) pair.
  """
  _, stem = _check_arch(arch)
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


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------

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
  _check_arch(arch)
  source = str(hub.parse_hub_path(path)) if hub.is_hub_path(path) else os.path.abspath(path)
  state = read_state_dict(path, allow_pickle=allow_pickle)
  weights, info = split_state_dict(state)
  variables, report = convert_state_dict(weights, arch, source=path)
  mean, std, how = resolve_normalization(normalization, info['normalizer'], arch)
  unused = info['unused'] + [info['prefix'] + k for k in report['unused']]
  if unused:
    log.warning('Not used from %s (not part of a %s): %s', path, arch, ', '.join(unused))
  model_arch, stem = ARCHS[arch]
  meta = {'format_version': FORMAT_VERSION, 'arch': arch, 'model_arch': model_arch, 'stem': stem,
          'width': report.get('width', report.get('dim')), 'num_classes': report['num_classes'],
          'mean': list(mean) if mean is not None else None, 'std': list(std) if std is not None else None,
          'normalization': how, 'layout': info['layout'], 'source': source,
          'unused_keys': unused}
  if models.is_vit(model_arch):  # width is the embedding width; the heads are the architecture's
    meta.update(dim=report['dim'], depth=report['depth'], heads=report['heads'], input_size=report['input_size'])
  return variables, meta


def build_model(meta: dict, lora_rank: int = 8, conv_impl: str = 'auto', **overrides):
  """The model a converted checkpoint's meta describes (its head size and input normalisation).

  `conv_impl` (ops.CONV_IMPLS) gives the convolutions for this process's default backend; `overrides`
  are `models.ResNet` or `models.ViT` attributes (input_size defaults to 224 for the ImageNet stem, 32 for
  the CIFAR layout and the position grid's for a ViT).
  """
  conv_fn, pool_fn = ops.convolutions(conv_impl, jax.default_backend())
  mean = tuple(meta['mean']) if meta['mean'] is not None else None
  std = tuple(meta['std']) if meta['std'] is not None else None
  if models.is_vit(meta['model_arch']):
    kwargs = dict(dim=meta['dim'], depth=meta['depth'], heads=meta['heads'], lora_rank=lora_rank,
                  stem=meta['stem'], conv_fn=conv_fn, input_size=meta['input_size'], mean=mean, std=std)
    kwargs.update(overrides)
    return models.VITS[meta['model_arch']](meta['num_classes'], **kwargs)
  kwargs = dict(width=meta['width'], lora_rank=lora_rank, stem=meta['stem'], conv_fn=conv_fn, pool_fn=pool_fn,
                input_size=224 if meta['stem'] == 'imagenet' else 32,
                mean=tuple(meta['mean']) if meta['mean'] is not None else None,
                std=tuple(meta['std']) if meta['std'] is not None else None)
  kwargs.update(overrides)
  return models.ARCHITECTURES[meta['model_arch']](meta['num_classes'], **kwargs)


def add_lora(model, variables: dict, seed: int = 0) -> dict:
  """`variables` (FE and head) completed with the model's LoRa parameters: A ~ N(0, 1) (a ViT's by its
  lora_init), B = 0 (SPEC.md); a ViT's position embedding resampled to the model's input size.

  Uses only the model's parameter shapes (no forward pass is compiled).
  """
  size = model.input_size if isinstance(model, models.ViT) else 32
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


# ----------------------------------------------------------------------------------------------------------
# Orbax storage (what the command line writes and config.pretrained=DIR reads)
# ----------------------------------------------------------------------------------------------------------

def save(directory: str, variables: dict, meta: dict, overwrite: bool = False) -> str:
  """Writes converted variables and their meta as an Orbax checkpoint (checkpoints.save_variables)."""
  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top (Orbax only when needed)
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(directory):
    if not overwrite:
      raise CheckpointError(f'{directory} exists already: choose another --dst or pass --overwrite.')
    if not is_converted(directory):
      raise CheckpointError(f'{directory} exists and is not a converted checkpoint: refusing to replace it.')
    shutil.rmtree(directory)
  return checkpoints.save_variables(directory, variables, meta)


def is_converted(directory: str) -> bool:
  """Whether `directory` looks like a checkpoint written by `save`."""
  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.has_variables(directory)


def load(directory: str) -> Tuple[dict, dict]:
  """(variables, meta) of a checkpoint written by `save` (numpy arrays)."""
  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top (Orbax only when needed)
  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise CheckpointError(f'The converted checkpoint {directory} does not exist. Make it with `python -m '
                          'autolora_jax.convert --src=FILE.ckpt --dst=DIR --arch=...` (see README.md).')
  if not is_converted(directory):
    raise CheckpointError(f'{directory} is not a converted checkpoint (no "variables" and "meta" items): make '
                          'it with `python -m autolora_jax.convert --src=FILE.ckpt --dst=DIR --arch=...`.')
  try:
    return checkpoints.restore_variables(directory)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(
        f'The converted checkpoint {directory} cannot be read ({e.cause}): convert the PyTorch file again '
        f'(`python -m autolora_jax.convert --src=FILE.ckpt --dst={directory} --arch=... --overwrite`).',
        folder=e.folder, step=e.step, cause=e.cause) from None


def load_any(path: str, arch: str, allow_pickle: bool = False) -> Tuple[dict, dict]:
  """(variables, meta) from a converted Orbax folder or, converted on the fly, a PyTorch or safetensors file,
  local or on the hub (hf://ORG/REPO/PATH[@REVISION]).

  For a folder, `arch` must match the architecture it was converted for.
  """
  if hub.is_hub_path(path):
    return convert_file(path, arch, allow_pickle=allow_pickle)
  if os.path.isdir(os.path.expanduser(path)):
    variables, meta = load(path)
    if meta.get('arch') != arch:
      model_arch, stem = ARCHS.get(meta.get('arch'), (meta.get('arch'), '?'))
      raise CheckpointError(
          f'{path} holds a converted {meta.get("arch")} (width {meta.get("width")}), but the run builds a '
          f'{arch}: set --config.model.arch={model_arch} --config.model.stem={stem}, or point '
          'config.pretrained at a checkpoint of the configured architecture.')
    return variables, meta
  return convert_file(os.path.expanduser(path), arch, allow_pickle=allow_pickle)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def _parse_floats(text: str, name: str) -> Tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    raise CheckpointError(f'--{name}={text!r}: give three comma-separated numbers, e.g. 0.5,0.5,0.5.') from None
  return values


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  if f.mean or f.std:
    if not (f.mean and f.std):
      raise CheckpointError('Pass --mean and --std together.')
    normalization = (_parse_floats(f.mean, 'mean'), _parse_floats(f.std, 'std'))
  else:
    normalization = f.normalization
  if os.path.exists(os.path.expanduser(f.dst)) and not f.overwrite:  # before the (slow) conversion
    raise CheckpointError(f'{os.path.abspath(os.path.expanduser(f.dst))} exists already: choose another --dst '
                          'or pass --overwrite.')
  variables, meta = convert_file(f.src, f.arch, normalization=normalization, allow_pickle=f.allow_pickle)
  directory = save(f.dst, variables, meta, overwrite=f.overwrite)
  n = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables))
  print(f'Converted {f.src} ({meta["layout"]} layout) -> {directory}\n'
        f'  {meta["arch"]}, width {meta["width"]}, {meta["num_classes"]}-way head, {n:,} numbers\n'
        f'  input normalisation ({meta["normalization"]}): mean {meta["mean"]}, std {meta["std"]}\n'
        f'  not used: {", ".join(meta["unused_keys"]) or "nothing"}\n'
        f'Fine-tune with --config.pretrained={directory}')


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('src', None, 'Checkpoint file: PyTorch (.ckpt/.pt/.pth) or .safetensors, local or on the '
                      'Hugging Face hub as hf://ORG/REPO/PATH[@REVISION].')
  flags.DEFINE_string('dst', None, 'Folder to write the Orbax checkpoint to.')
  flags.DEFINE_enum('arch', None, list(ARCHS), 'Architecture of the checkpoint.')
  flags.DEFINE_enum('normalization', 'auto', list(NORMALIZATIONS),
                    "Input normalisation the model applies: 'auto' = the checkpoint's normaliser if any, else "
                    'ImageNet statistics (ImageNet stem) or none (CIFAR layout).')
  flags.DEFINE_string('mean', '', 'Explicit per-channel mean, e.g. 0.4914,0.4822,0.4465 (with --std).')
  flags.DEFINE_string('std', '', 'Explicit per-channel std (with --mean).')
  flags.DEFINE_bool('allow_pickle', False, 'Also read files holding Python objects (runs code from the file: '
                    'only for files you trust).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing converted checkpoint at --dst.')
  flags.mark_flags_as_required(['src', 'dst', 'arch'])


def run_cli() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')

  def guarded(argv):
    try:
      main(argv)
    except CheckpointError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(guarded)


if __name__ == '__main__':
  run_cli()
