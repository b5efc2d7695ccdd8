"""The workdir of a run: writable, holding this run only, and never emptied silently.

`claim(workdir, config, overwrite)` runs before anything expensive. It
* refuses a workdir that cannot be written, or that is a file;
* compares the config with the workdir's config.json: the same config resumes the run in it; a different
  one (or run files without a config.json) is refused, unless `overwrite`, which moves the old run's files
  to workdir/replaced/<time>/ (nothing is deleted) and starts afresh;
* writes config.json (process 0).
It returns a `Workdir` whose `rollback()` undoes what this start did (removes what it created, moves a
replaced run back), so that a run stopped by bad input found later at start-up (a pre-trained checkpoint of
the wrong architecture, say) leaves the workdir as it was.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from typing import List, Optional

import jax

from autolora_jax import distributed
from autolora_jax.errors import WorkdirError

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
REPLACED_DIR = 'replaced'
# What a run writes into its workdir; another run's copies of these are moved aside by --overwrite.
RUN_FILES = (CONFIG_FILE, 'checkpoints', 'pretrain', 'metrics.jsonl', 'results.json', 'curves.png',
             'tensorboard', 'eval_state', 'corruptions.png')
# Keys that do not change what a run computes: they may differ between a run and its resumption (a key
# stands for itself and every key below it). pretrain.cache_dir only says where the fingerprinted FE is
# cached: a comparison folder moved elsewhere resumes.
IGNORED_KEYS = ('progress', 'tensorboard', 'distributed', 'host', 'pretrain.cache_dir')
# Keys added later whose value here is what every run computed before they existed: a run whose
# config.json lacks them resumes when they have this value.
ADDED_KEYS = {'model.precision': 'default', 'attack.norm': 'linf', 'autoattack.norm': 'auto', 'autoattack.eps': 0.0,
              'autoattack.attacks': [], 'model.lora_targets': ['q', 'k', 'v', 'proj', 'fc1', 'fc2'],
              'model.lora_init': 'normal', 'model.vit.dim': 0, 'model.vit.depth': 0, 'model.vit.heads': 0,
              'autoattack.points': 'first', 'eval.corruptions': [], 'eval.severities': [1, 2, 3, 4, 5],
              'eval.corruption_seed': 0, 'eval.corruption_points': 0, 'eval.corruption_source': 'auto',
              'model.convnext.dim': 0, 'model.convnext.depths': [], 'model.swin.dim': 0, 'model.swin.heads': 0,
              'model.swin.depths': [], 'model.swin.window': 7, 'model.drop_path': 0.0}


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples as lists), as config.json holds it."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def config_differences(old: dict, new: dict) -> List[str]:
  """'key: old -> new' for each key whose value differs; [] when the runs match.

  Not counted: IGNORED_KEYS; the keys of a method's own config section (`Method.sections`, e.g. config.twins)
  that the old run lacks and the new run's method does not read (a run of another method that began before
  the section existed resumes, and a finished one is recognised by the comparison); ADDED_KEYS the old run
  lacks, at their value.
  """
  from autolora_jax import methods  # pylint: disable=g-import-not-at-top (imports jax programs; only here)
  a, b = _flatten(old), _flatten(new)
  unread = methods.unread_sections(new.get('method'))
  out = []
  for key in sorted(set(a) | set(b)):
    if any(key == k or key.startswith(k + '.') for k in IGNORED_KEYS):
      continue
    if key not in a and any(key.startswith(s + '.') for s in unread):
      continue
    if key not in a and key in ADDED_KEYS and b.get(key) == ADDED_KEYS[key]:
      continue
    if a.get(key, '<absent>') != b.get(key, '<absent>'):
      out.append(f'{key}: {a.get(key, "<absent>")!r} -> {b.get(key, "<absent>")!r}')
  return out


def check_writable(path: str) -> None:
  """Creates `path` (and parents) if needed and writes a probe file; WorkdirError if that fails."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test_{os.getpid()}_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'The workdir {path} cannot be written ({e.strerror or e}): choose a folder you can '
                       'write to with --workdir=DIR, or fix its permissions.') from None


class Workdir:
  """A claimed workdir: `path`, and what this start changed in it (for `rollback`)."""

  def __init__(self, path: str, created_root: Optional[str], before: set, moved_to: Optional[str],
               created_replaced: bool, is_chief: bool):
    self.path, self.created_root, self.before = path, created_root, before
    self.moved_to, self.created_replaced, self.is_chief = moved_to, created_replaced, is_chief

  def rollback(self) -> None:
    """Removes what this start created in the workdir and moves a replaced run back (process 0).

    Keeps everything that existed before, and anything holding a checkpoint saved since.
    """
    if not self.is_chief or not os.path.isdir(self.path):
      return
    for name in sorted(set(os.listdir(self.path)) - self.before):
      if name == REPLACED_DIR and self.moved_to is not None:
        continue
      if _holds_checkpoint(os.path.join(self.path, name)):
        log.warning('Rollback keeps %s: it holds a checkpoint.', os.path.join(self.path, name))
        continue
      target = os.path.join(self.path, name)
      shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    if self.moved_to is not None:  # move the replaced run back, over what this start wrote in its place
      for name in os.listdir(self.moved_to):
        target = os.path.join(self.path, name)
        if os.path.exists(target):
          if _holds_checkpoint(target):
            log.warning('Rollback keeps %s (it holds a checkpoint); the replaced run stays in %s.', target,
                        self.moved_to)
            continue
          shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        shutil.move(os.path.join(self.moved_to, name), target)
      if not os.listdir(self.moved_to):
        os.rmdir(self.moved_to)
      replaced = os.path.join(self.path, REPLACED_DIR)
      if self.created_replaced and os.path.isdir(replaced) and not os.listdir(replaced):
        os.rmdir(replaced)
    if self.created_root is not None:  # remove the folders this start created, if still empty
      folder = self.path
      while not os.listdir(folder):
        os.rmdir(folder)
        if folder == self.created_root:
          break
        folder = os.path.dirname(folder)


def _holds_checkpoint(path: str) -> bool:
  """Whether `path` holds a finished Orbax checkpoint (a file commit_success.txt or _CHECKPOINT_METADATA)."""
  if not os.path.isdir(path):
    return False
  marks = ('commit_success.txt', '_CHECKPOINT_METADATA')
  return any(m in files for _, _, files in os.walk(path) for m in marks)


def _describe(differences: List[str]) -> str:
  shown = '; '.join(differences[:6])
  return shown + (f'; and {len(differences) - 6} more' if len(differences) > 6 else '')


def claim(workdir: Optional[str], config, overwrite: bool = False) -> Workdir:
  """Checks and prepares `workdir` for a run of `config` (see the module docstring)."""
  if not workdir:
    raise WorkdirError('No workdir given: pass --workdir=DIR, the folder for checkpoints, logs and results.')
  path = os.path.abspath(os.path.expanduser(workdir))
  is_chief = jax.process_index() == 0
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'The workdir {path} is a file, not a folder: choose another --workdir=DIR.')
  existed = os.path.isdir(path)
  created_root = None  # the outermost folder that this start creates
  if not existed:
    created_root = path
    while not os.path.exists(os.path.dirname(created_root)):
      created_root = os.path.dirname(created_root)
  before = set(os.listdir(path)) if existed else set()
  new = config_dict(config)
  differences: List[str] = []
  config_path = os.path.join(path, CONFIG_FILE)
  if os.path.exists(config_path):
    try:
      with open(config_path) as f:
        old = json.load(f)
      differences = config_differences(old, new)
    except (OSError, ValueError) as e:
      differences = [f'{CONFIG_FILE} cannot be read ({e})']
  elif before & set(RUN_FILES):
    differences = [f'it holds {", ".join(sorted(before & set(RUN_FILES)))} but no {CONFIG_FILE}, so the '
                   'config of that run is unknown']
  moved_to, created_replaced = None, False
  if differences and not overwrite:
    raise WorkdirError(
        f'The workdir {path} holds a run of a different config ({_describe(differences)}). Resuming it '
        'with this config would mix two runs. Choose another --workdir, or pass --overwrite to move the '
        f'old run to {os.path.join(path, REPLACED_DIR, "<time>")}/ and start afresh (nothing is deleted).')
  check_writable(path)
  if differences:  # and overwrite: move the old run's files aside
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    moved_to = os.path.join(path, REPLACED_DIR, stamp)
    if is_chief:
      created_replaced = not os.path.isdir(os.path.join(path, REPLACED_DIR))
      os.makedirs(moved_to, exist_ok=False)
      for name in sorted(before & set(RUN_FILES)):
        shutil.move(os.path.join(path, name), os.path.join(moved_to, name))
      log.warning('The workdir held a run of a different config (%s): moved it to %s.',
                  _describe(differences), moved_to)
  if is_chief and (differences or not os.path.exists(config_path)):
    tmp = config_path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2) + '\n')
    os.replace(tmp, config_path)
  distributed.barrier('workdir claimed')
  return Workdir(path, created_root, before, moved_to, created_replaced, is_chief)
