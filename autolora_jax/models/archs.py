"""Architectures as specs: everything the rest of the package needs to know about an architecture, by name.

An `ArchSpec` is a plain value: how to build the model, whether it has BatchNorm, its stems and LoRa
options, the module that maps its PyTorch checkpoints (`autolora_jax.convert`) and its pre-trained
checkpoint's name. Each family module of this package (resnet.py, vit.py) defines its specs as a
module-level `SPECS` tuple; the package collects them on import (models/__init__.py), so a new family is one
module with its `SPECS` (and, for checkpoints, one mapping module in convert/). Code outside models/ asks
`spec(arch)` what it needs instead of testing for a family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """One architecture (`config.model.arch`).

  Attributes:
    name: the `config.model.arch` value, e.g. 'resnet18'.
    label: the family in messages, e.g. 'ResNet', 'ViT'.
    builder: (num_classes, **attributes) -> the Flax module.
    attributes: config.model -> the builder attributes only this family reads from it (a ResNet's width and
      lora_placement, a ViT's lora_targets, lora_init and sizes); `models.create_model` adds the common ones.
    has_batchnorm: the model has BatchNorm layers and a non-empty 'batch_stats' collection (TWINS doubles
      them).
    stems: the `config.model.stem` values it takes; the first is the ImageNet one.
    lora_placements: the `config.model.lora_placement` values it takes ('all' first).
    lora_targets: the `config.model.lora_targets` names it takes; () when it does not read them.
    ignores: common builder attributes it does not have and drops (e.g. a ViT's 'width', 'pool_fn').
    reference_code: the authors' public code builds it, so `config.reference_compat` applies.
    converter: the module mapping its PyTorch checkpoints, e.g. 'autolora_jax.convert.resnet' ('' for none);
      named, not imported: autolora_jax.convert imports it.
    pretrained: the name of its robust ImageNet checkpoint, e.g. 'resnet18_linf_eps4.0' (configs/default.py
      looks for pretrained/<name>); '' for none.
    drop_path: the model takes `config.model.drop_path` (stochastic depth in training mode, with one key per
      example: `models.stochastic_depth`).
    check_config: config.model -> None, raising `errors.ConfigError` for a setting this family cannot build,
      with the fix (stems and the common keys are checked by config_checks); None for nothing more.
  """
  name: str
  label: str
  builder: Callable[..., Any]
  attributes: Callable[[Any], Dict[str, Any]] = lambda model_config: {}
  has_batchnorm: bool = True
  stems: Tuple[str, ...] = ('imagenet',)
  lora_placements: Tuple[str, ...] = ('all',)
  lora_targets: Tuple[str, ...] = ()
  ignores: Tuple[str, ...] = ()
  reference_code: bool = False
  converter: str = ''
  pretrained: str = ''
  drop_path: bool = False
  check_config: Optional[Callable[[Any], None]] = None

  def takes(self, attribute: str) -> bool:
    """Whether the builder has `attribute` (False for one in `ignores`)."""
    return attribute not in self.ignores

  def build(self, num_classes: int, **attributes):
    """The model with `attributes`, those in `ignores` dropped."""
    placement = attributes.get('lora_placement', 'all')
    if placement not in self.lora_placements:
      raise ValueError(f'lora_placement={placement!r} is not one of {self.name}\'s {self.lora_placements}'
                       + ('; it places LoRa by lora_targets.' if self.lora_targets else '.'))
    return self.builder(num_classes, **{k: v for k, v in attributes.items() if k not in self.ignores})


_REGISTRY: Dict[str, ArchSpec] = {}


def register(arch_spec: ArchSpec, replace: bool = False) -> ArchSpec:
  """Adds `arch_spec` under its name (ValueError for a taken name unless `replace`); returns it."""
  if arch_spec.name in _REGISTRY and not replace and _REGISTRY[arch_spec.name] is not arch_spec:
    raise ValueError(f'Architecture {arch_spec.name!r} is registered already.')
  _REGISTRY[arch_spec.name] = arch_spec
  return arch_spec


def unregister(name: str) -> None:
  """Removes an architecture (e.g. one a test registered)."""
  _REGISTRY.pop(name, None)


def spec(arch: str) -> ArchSpec:
  """The spec of `arch`; ValueError naming the known architectures for an unknown one."""
  try:
    return _REGISTRY[arch]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown architecture {arch!r}: choose one of {arch_names()}.') from None


def specs() -> Tuple[ArchSpec, ...]:
  """Every registered spec, in registration order (the families' modules alphabetically)."""
  return tuple(_REGISTRY.values())


def arch_names() -> Tuple[str, ...]:
  """Every registered architecture name."""
  return tuple(_REGISTRY)


class ArchView(Mapping):
  """A read-only mapping that is always `current()`, a dict computed from the registered specs (so that it
  follows `register` and `unregister`)."""

  def __init__(self, current: Callable[[], Dict[str, Any]]):
    self._current = current

  def __getitem__(self, name: str):
    return self._current()[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._current())

  def __len__(self) -> int:
    return len(self._current())

  def __repr__(self) -> str:
    return repr(self._current())


def collect(modules) -> None:
  """Registers the `SPECS` of each module in `modules` (models/__init__.py passes the package's own)."""
  for module in modules:
    for arch_spec in getattr(module, 'SPECS', ()):
      register(arch_spec)
