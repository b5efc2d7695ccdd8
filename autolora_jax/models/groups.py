"""Parameter groups: every parameter is 'fe' (feature extractor: convolutions and BatchNorm), 'lora'
(lora_A, lora_B) or 'head' (the classifier); the optimizer, the train step and the tests sort by these."""

from __future__ import annotations

import jax
import numpy as np


def param_group(path) -> str:
  """'lora' for LoRa parameters, 'head' for the classifier, 'fe' for the feature extractor (conv + BN).

  `path`: a pytree key path (DictKey/GetAttrKey entries) or a sequence of names.
  """
  names = [getattr(p, 'key', getattr(p, 'name', str(p))) for p in path]
  if names and names[-1] in ('lora_A', 'lora_B'):
    return 'lora'
  if names and names[0] == 'head':
    return 'head'
  return 'fe'


def param_groups(params):
  """A pytree of the same structure as params whose leaves are 'fe', 'lora' or 'head'."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def lora_params_count(params) -> int:
  """Number of LoRa parameters in a params tree."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(int(np.prod(v.shape)) for p, v in leaves if param_group(p) == 'lora')
