"""The --arch names and each architecture's checkpoint mapping, found through its spec (`models.spec(arch)
.converter`): the rest of convert/ asks here, never for a family by name.

A mapping module (convert/resnet.py, convert/vit.py) provides:

* LABEL: the family in messages ('ResNet'); ANCHOR: a state-dict key only its checkpoints have (it also
  tells the prefix the network sits under); optionally ANCHORS, every such key of the layouts it reads
  (ANCHOR first); ANCHOR_NAME: that key described for messages.
* describe(weights) -> str: what a prefix-free state dict of the family holds; an --arch name when it is one.
* convert_state_dict(weights, arch, model_arch, stem, source) -> (variables, report).
* meta(report) -> dict: the converted meta's family fields ('width' always).
* model_config(meta) -> dict: the `config.model` fields of the converted model besides arch, stem,
  lora_rank, mean and std (`build_model`).
* torch_key(path, stem) -> str: the PyTorch key of a 'collection/.../leaf' path (the export).
* export_fields(model, params) -> dict: the architecture fields of an export's model.json.
"""

from __future__ import annotations

import importlib
from typing import Dict, Mapping, Optional, Tuple

from autolora_jax import models
from autolora_jax.convert.common import converted_archs
from autolora_jax.errors import CheckpointError

# --arch -> (config.model.arch, stem), always current with the registered specs (`converted_archs`).
ARCHS: Mapping[str, Tuple[str, str]] = models.ArchView(converted_archs)


def check_arch(arch: str) -> Tuple[str, str]:
  """(config.model.arch, stem) of an --arch; CheckpointError naming the choices for an unknown one."""
  archs = converted_archs()
  if arch not in archs:
    raise CheckpointError(f'Unknown architecture {arch!r} for conversion: choose one of {tuple(archs)}.')
  return archs[arch]


def mapping(model_arch: str):
  """The mapping module of a config.model.arch; CheckpointError when it has none."""
  converter = models.spec(model_arch).converter
  if not converter:
    raise CheckpointError(f'There is no checkpoint conversion for {model_arch}: convertible architectures are '
                          f'{tuple(converted_archs())}.')
  return importlib.import_module(converter)


def mappings() -> Tuple:
  """Every mapping module, each once, in the specs' order."""
  names = dict.fromkeys(s.converter for s in models.specs() if s.converter)
  return tuple(importlib.import_module(n) for n in names)


def anchors(mapping_module) -> Tuple[str, ...]:
  """The keys that mark a state dict of a mapping's family: its ANCHORS, or its ANCHOR alone."""
  return tuple(getattr(mapping_module, 'ANCHORS', (mapping_module.ANCHOR,)))


def identify(weights: Dict) -> Optional[object]:
  """The mapping one of whose anchors a prefix-free state dict has, or None."""
  return next((m for m in mappings() if any(a in weights for a in anchors(m))), None)


__all__ = ['ARCHS', 'anchors', 'check_arch', 'identify', 'mapping', 'mappings']
