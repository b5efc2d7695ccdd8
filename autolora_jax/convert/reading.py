"""Reading a checkpoint file into a state dict of numpy arrays (PyTorch pickle or safetensors, local or a
hub file), and finding the network, its prefix and its input normaliser in it."""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, Tuple

import jax.numpy as jnp
import numpy as np

from autolora_jax import hub
from autolora_jax.convert import families
from autolora_jax.errors import CheckpointError

log = logging.getLogger(__name__)

TORCH_INSTALL = 'pip install torch --index-url https://download.pytorch.org/whl/cpu'
SAFETENSORS_INSTALL = "pip install 'safetensors>=0.4,<1'"

# Where the network sits in a state dict: the robustness library's 'module.model.', RobustBench's and
# Singh et al.'s nn.Sequential(normalize, model) 'model.', DataParallel's 'module.', a bare nn.Sequential's
# '1.', or nothing.
_PREFIXES = ('module.model.', 'model.', 'module.1.', 'module.', '1.', '')
# The input normaliser in front of it: the robustness library's normalizer.new_mean/new_std, RobustBench's
# normalize.mean/std (ImageNormalizer buffers of shape (1, 3, 1, 1)), or a bare nn.Sequential's 0.mean/std.
_NORMALIZER = re.compile(r'(^|\.)(normalizer\.new_|normalizer\.|normalize\.|^0\.|module\.0\.)(?P<stat>mean|std)$')


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
    raise CheckpointError(f'The checkpoint {path} does not exist. Download it (see docs/checkpoints_and_data.md, "1. Getting the robust '
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
  anchors = [a for m in families.mappings() for a in families.anchors(m)]
  prefix = next((p for p in _PREFIXES if any(p + a in state for a in anchors)), None)
  if prefix is None:
    labels = [m.LABEL for m in families.mappings()]
    raise CheckpointError(
        f"The state dict holds no {' and no '.join(labels)}: no "
        f"{' and no '.join(m.ANCHOR_NAME for m in families.mappings())} under any of the prefixes "
        f"{', '.join(repr(p) for p in _PREFIXES[:-1])} or none. Its first keys are {sorted(state)[:6]}.")
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
