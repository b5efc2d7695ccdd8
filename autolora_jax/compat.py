"""Reading what other versions of the package wrote: every migration of workdirs and checkpoints in one place.

A run's files record the version of their layout, `FORMAT_VERSION`: its workdir's config.json and each of its
checkpoints' metadata hold the key 'format_version'. Files without the key are version 1. Readers pass what
they read through `upgrade_config` or `upgrade_checkpoint_meta`, which bring it to the current version
step by step, and refuse files of a newer version with what to do. Adding a config key or changing what a
checkpoint records means: raise `FORMAT_VERSION`, and add the step from the previous version here.

Version 1 to 2:
* config.json: keys added to the config after a run began stand at the value every run computed before they
  existed (`V1_CONFIG_DEFAULTS`), so that run resumes and is recognised by the comparison.
* checkpoint metadata: the automatic learning rate's state was nested under policy['auto'] with the names
  best_at_checkpoint and halved_at_checkpoint; the input normalisation may be missing (`--mode=eval` then
  takes it from the run's pre-trained checkpoint).

Version 2 to 3:
* config.json: the keys of the automatic initial learning rate and of the ConvNeXt and Swin families
  (`V2_CONFIG_DEFAULTS`; lr0 itself is unchanged).

Version 3 to 4:
* config.json: config.eval.val_attacks (`V3_CONFIG_DEFAULTS`: none, as every earlier run).

Version 4 to 5:
* config.json: config.model.attention_impl (`V4_CONFIG_DEFAULTS`: 'auto', the default, so that earlier runs
  resume: on CPUs it computes the einsums every earlier run computed; on GPUs and TPUs the same numbers
  within float round-off).

Version 5 to 6:
* config.json: config.model.remat (`V5_CONFIG_DEFAULTS`: 'none', as every earlier run).

The converted checkpoints (`autolora_jax.convert`), the exported models (`autolora_jax.export`) and
AutoAttack's resumable state (`autolora_jax.eval_progress`) carry format versions of their own.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

from autolora_jax.errors import CheckpointError, WorkdirError

FORMAT_VERSION = 6
KEY = 'format_version'

# Config keys that version-1 runs may lack, at the value every run computed before the key existed.
V1_CONFIG_DEFAULTS: Dict[str, Any] = {
    'model.precision': 'default', 'attack.norm': 'linf', 'autoattack.norm': 'auto', 'autoattack.eps': 0.0,
    'autoattack.attacks': [], 'model.lora_targets': ['q', 'k', 'v', 'proj', 'fc1', 'fc2'],
    'model.lora_init': 'normal', 'model.vit.dim': 0, 'model.vit.depth': 0, 'model.vit.heads': 0,
    'autoattack.points': 'first', 'eval.corruptions': [], 'eval.severities': [1, 2, 3, 4, 5],
    'eval.corruption_seed': 0, 'eval.corruption_points': 0, 'eval.corruption_source': 'auto'}

# Config keys that version-2 runs lack, at the value every such run computed.
V2_CONFIG_DEFAULTS: Dict[str, Any] = {
    'auto_lr.lr0_candidates': [0.003, 0.01, 0.03, 0.1], 'auto_lr.probe_steps': 0, 'model.convnext.dim': 0,
    'model.convnext.depths': [], 'model.swin.dim': 0, 'model.swin.heads': 0, 'model.swin.depths': [],
    'model.swin.window': 7, 'model.drop_path': 0.0}

# Config keys that version-3 runs lack, at the value every such run computed.
V3_CONFIG_DEFAULTS: Dict[str, Any] = {'eval.val_attacks': []}

# Config keys that version-4 runs lack, at the default (see the module docstring).
V4_CONFIG_DEFAULTS: Dict[str, Any] = {'model.attention_impl': 'auto'}

# Config keys that version-5 runs lack, at the value every such run computed.
V5_CONFIG_DEFAULTS: Dict[str, Any] = {'model.remat': 'none'}

_UPGRADE = ('Upgrade autolora-jax (pip install -U autolora-jax) to read it, or use another folder for this '
            'version\'s runs.')


def version_of(record: Mapping[str, Any]) -> int:
  """The format version a config.json or checkpoint metadata records (1 when it records none)."""
  return int(record.get(KEY, 1))


def stamp(record: Mapping[str, Any]) -> dict:
  """`record` (a config.json's data or a checkpoint's metadata) with the current format version."""
  return {**record, KEY: FORMAT_VERSION}


def _check_known(version: int, what: str, error) -> None:
  if version > FORMAT_VERSION:
    raise error(f'{what} was written by a newer autolora-jax (format version {version}; this one reads up to '
                f'{FORMAT_VERSION}). {_UPGRADE}')


def _set_defaults(data: dict, defaults: Mapping[str, Any]) -> None:
  """Sets each dotted key of `defaults` that `data` lacks (nested dicts) to a copy of its value."""
  for dotted, value in defaults.items():
    *parents, leaf = dotted.split('.')
    node = data
    for parent in parents:
      node = node.setdefault(parent, {})
    if isinstance(node, dict):
      node.setdefault(leaf, copy.deepcopy(value))


def upgrade_config(data: Mapping[str, Any], source: str = 'config.json') -> dict:
  """A workdir's config.json data as the current version writes it, without the version key.

  Raises WorkdirError for a file of a newer version (`source` names it in the message).
  """
  data = copy.deepcopy(dict(data))
  version = version_of(data)
  data.pop(KEY, None)
  _check_known(version, source, WorkdirError)
  if version < 2:
    _set_defaults(data, V1_CONFIG_DEFAULTS)
  if version < 3:
    _set_defaults(data, V2_CONFIG_DEFAULTS)
  if version < 4:
    _set_defaults(data, V3_CONFIG_DEFAULTS)
  if version < 5:
    _set_defaults(data, V4_CONFIG_DEFAULTS)
  if version < 6:
    _set_defaults(data, V5_CONFIG_DEFAULTS)
  return data


def upgrade_checkpoint_meta(meta: Mapping[str, Any], source: str = 'the checkpoint') -> dict:
  """A checkpoint's metadata as the current version writes it (with the version key).

  Raises CheckpointError for a checkpoint of a newer version.
  """
  meta = copy.deepcopy(dict(meta))
  version = version_of(meta)
  _check_known(version, source, CheckpointError)
  if version < 2 and isinstance(meta.get('policy'), dict):  # 2 -> 3, 3 -> 4 and 4 -> 5 changed nothing here
    policy = meta['policy']
    auto = policy.pop('auto', None) or {}
    for old, new in (('best_at_checkpoint', 'best_at_window'), ('halved_at_checkpoint', 'halved_at_window'),
                     ('history', 'history'), ('window_index', 'window_index')):
      if old in auto:
        policy[new] = auto[old]
  meta[KEY] = FORMAT_VERSION
  return meta

