"""Every Orbax use of the package: the checkpoints of a run (in its workdir), and folders of variables.

    checkpoints/latest/<step>/           full TrainState + JSON metadata (epoch, policy, scalars, ...)
    checkpoints/best/<step>/             {'params', 'batch_stats'} + JSON metadata (epoch, val metrics)
    checkpoints/damaged/<which>-<step>/  checkpoints found unreadable, moved aside (kept)

`Checkpoints` saves asynchronously (the step loop goes on while Orbax writes) and keeps 'latest' and 'best'
in separate managers, so that the best-keeping policy can never
delete the latest state (and vice versa). Checkpoint ids are global optimizer steps (best: epochs). States
are saved and restored as host numpy arrays, unreplicated; the caller replicates them over its devices.

A damaged checkpoint (truncated or missing files, undecodable JSON: the storage's read errors, see
`is_read_error`) is told apart from one that does not fit the config (another tree structure or shapes: a
`CheckpointError`). Restoring the newest checkpoint skips damaged ones: the newest intact one is used, and
each damaged one is moved to checkpoints/damaged/ with one warning (never deleted, and out of the reach of
the managers' max_to_keep). When none can be read, `restore` raises `DamagedCheckpointError` and moves
nothing, unless the caller says what it does instead (`if_lost`).

`save_variables` / `restore_variables`: one folder with the items 'variables' and 'meta' (the checkpoints
`python -m autolora_jax.convert` writes, and the cache of the in-process pre-trained FE).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from typing import Any, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import jax_utils

from autolora_jax import compat, distributed
from autolora_jax.errors import CheckpointError, DamagedCheckpointError

log = logging.getLogger(__name__)

DAMAGED_DIR = 'damaged'
AS_SAVED = object()  # `Checkpoints._read`'s template for "the tree as it was saved"
_STATUS = re.compile(r'([A-Z][A-Z_]+): ')  # TensorStore's status codes: OUT_OF_RANGE, DATA_LOSS, ...


def is_read_error(error: BaseException) -> bool:
  """Whether `error`, raised by an Orbax restore, says that the stored files cannot be read (truncated,
  missing, undecodable), as opposed to a tree that does not fit the one asked for."""
  if isinstance(error, (OSError, EOFError, json.JSONDecodeError)):
    return True
  if isinstance(error, KeyError):  # an item folder ('state', 'meta', ...) is missing
    return 'was not found in the checkpoint' in str(error)
  return isinstance(error, (ValueError, RuntimeError)) and _STATUS.match(str(error)) is not None


def _cause(error: BaseException) -> str:
  """A read error in one line: TensorStore's status code and its innermost message, else type: message."""
  text = ' '.join(str(error).split(' [tensorstore_spec')[0].split()).strip('\'"')
  status = _STATUS.match(text)
  text = f'{status.group(1)}: {text.rsplit(": ", 1)[-1]}' if status else f'{type(error).__name__}: {text}'
  return text if len(text) <= 240 else text[:237] + '...'


@contextlib.contextmanager
def _reading(folder: str, step: Optional[int] = None):
  """Turns a read error (`is_read_error`) inside the block into DamagedCheckpointError(folder, step); any
  other error passes as it is."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except (sorted by is_read_error; the rest is re-raised)
    if not is_read_error(e):
      raise
    cause = _cause(e)
    raise DamagedCheckpointError(f'The checkpoint {folder} cannot be read ({cause}).', folder=folder,
                                 step=step, cause=cause) from e


def verify_item(item_dir: str) -> None:
  """Reads every value stored in an OCDBT item folder (e.g. <step>/state) once, one after the other.

  A truncated, missing or garbled file then raises its read error here, before Orbax's concurrent restore,
  which leaves stray asyncio tracebacks and warnings behind when one of its reads fails. A folder in
  another format is left to Orbax.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top (Orbax's storage layer)
  if not os.path.isdir(item_dir):
    raise FileNotFoundError(f'{item_dir} does not exist')
  if not os.path.exists(os.path.join(item_dir, 'manifest.ocdbt')):
    if any(n == 'd' or n.startswith('ocdbt.process_') for n in os.listdir(item_dir)):
      raise FileNotFoundError(f'{os.path.join(item_dir, "manifest.ocdbt")} is missing')
    return
  store = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{os.path.abspath(item_dir)}'}).result()
  for key in store.list().result():
    store.read(key).result()


def _check_shapes(folder: str, template: Any, restored: Any) -> None:
  """CheckpointError when the restored arrays have other shapes than the template's (Orbax restores numpy
  arrays in their stored shapes whatever the template says)."""
  got = jax.tree_util.tree_leaves_with_path(restored)
  want = jax.tree_util.tree_leaves(template)
  bad = [f'{jax.tree_util.keystr(path)}: {np.shape(a)} stored, {np.shape(b)} expected'
         for (path, a), b in zip(got, want) if np.shape(a) != np.shape(b)]
  if bad or len(got) != len(want):
    raise CheckpointError(f'The checkpoint {folder} does not fit the model this config builds (shape '
                          f'mismatches {bad[:5]}{"..." if len(bad) > 5 else ""}): use the config it was '
                          'written with.')


def move_aside(folder: str, target: str) -> str:
  """Moves a damaged `folder` to `target` (or `target.1`, `.2`, ... if taken), keeping it; returns the new
  path. Multi-process: every process chooses the path, then process 0 moves, then every process waits."""
  n, path = 0, target
  while os.path.exists(path):
    n += 1
    path = f'{target}.{n}'
  distributed.barrier(f'moving aside {os.path.basename(path)}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.move(folder, path)
  distributed.barrier(f'moved aside {os.path.basename(path)}')
  return path


def host_copy(tree, replicated: bool):
  """The tree as host numpy arrays; the first replica of a pmap-replicated tree."""
  return jax.device_get(jax_utils.unreplicate(tree) if replicated else tree)


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'meta'))


def _epoch_text(meta: Optional[dict]) -> str:
  """'epoch E' (and where a preempted epoch stopped) from a checkpoint's metadata; '' if unknown."""
  if not isinstance(meta, dict) or 'epoch' not in meta:
    return ''
  position = meta.get('position')
  if position:
    return f'epoch {meta["epoch"]}, stopped at step {position["step"]} of epoch {position["epoch"]}'
  return f'epoch {meta["epoch"]}'


class Checkpoints:
  """The 'latest' and 'best' checkpoint managers of one workdir.

  Saves are asynchronous: `save` returns once Orbax holds the host arrays, and the files are written
  while training goes on. Every read (`restore`, `restore_meta`, `latest_step`), the next save of the same
  manager, `wait` and `close` first wait for the saves in flight, so nothing ever sees a half-written one;
  a run that stops (preemption, error) leaves through `wait` or `close`.
  """

  def __init__(self, workdir: str, keep_latest: int = 2):
    self.root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.managers = {'latest': _manager(os.path.join(self.root, 'latest'), keep_latest),
                     'best': _manager(os.path.join(self.root, 'best'), 1)}

  def latest_step(self, which: str = 'latest') -> Optional[int]:
    self.wait()
    return self.managers[which].latest_step()

  def wait(self) -> None:
    """Waits until every save in flight is on disk."""
    for manager in self.managers.values():
      manager.wait_until_finished()

  def folder(self, which: str, step: int) -> str:
    return os.path.join(str(self.managers[which].directory), str(step))

  def save(self, which: str, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (a host pytree, not changed afterwards) and `meta` (JSON-serialisable) under id `step`,
    asynchronously (see the class docstring)."""
    manager = self.managers[which]
    manager.wait_until_finished()  # the previous save of this manager (an epoch ago: done by now)
    if step in manager.all_steps():  # e.g. re-saving 'latest' at the same step after a best reload
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(compat.stamp(meta))))

  def restore(self, which: str, template: Any, step: Optional[int] = None, *,
              if_lost: Optional[str] = None) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of checkpoint `step` shaped like `template`; None if there is no checkpoint.

    Without `step`: the newest checkpoint that can be read; newer damaged ones are moved aside with one
    warning. When none can be read: DamagedCheckpointError (nothing moved), or, given `if_lost` (what the
    caller does instead, a sentence for the warning), they are moved aside with a warning and None is
    returned. A given `step` that cannot be read raises DamagedCheckpointError.
    Raises CheckpointError when the checkpoint does not fit `template`.
    """
    return self._newest_intact(which, template, step, if_lost)

  def restore_meta(self, which: str, step: Optional[int] = None) -> Optional[dict]:
    """Only the JSON metadata of a checkpoint (cheap), with `restore`'s rules for damaged ones; None if
    there is none."""
    found = self._newest_intact(which, None, step, None)
    return None if found is None else found[1]

  def restore_as_saved(self, which: str) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the newest readable checkpoint as it was saved (nested dicts of numpy arrays: no
    template, so no model is needed to read it), with `restore`'s rules for damaged ones; None if there is
    none."""
    return self._newest_intact(which, AS_SAVED, None, None)

  def _read(self, which: str, step: int, template: Any) -> Tuple[Any, dict]:
    """(state, meta) of one checkpoint (state None without a template, as saved for AS_SAVED);
    DamagedCheckpointError if its files cannot be read."""
    items = {'meta': ocp.args.JsonRestore()}
    if template is not None:
      items['state'] = ocp.args.StandardRestore(None if template is AS_SAVED else template)
    with _reading(self.folder(which, step), step):
      if template is not None:
        verify_item(os.path.join(self.folder(which, step), 'state'))
      restored = self.managers[which].restore(step, args=ocp.args.Composite(**items))
    meta = compat.upgrade_checkpoint_meta(restored['meta'], self.folder(which, step))
    if template is None:
      return None, meta
    if template is AS_SAVED:
      return jax.tree_util.tree_map(np.asarray, restored['state']), meta
    _check_shapes(self.folder(which, step), template, restored['state'])
    return restored['state'], meta

  def _meta_or_none(self, which: str, step: int) -> Optional[dict]:
    try:
      return self._read(which, step, None)[1]
    except DamagedCheckpointError:
      return None

  def _set_aside(self, which: str, damaged: List[DamagedCheckpointError], then: str) -> None:
    """Moves damaged checkpoints to checkpoints/damaged/<which>-<step>/ and says so in one warning that
    ends with `then` (what happens instead)."""
    moves = []
    for e in damaged:
      epoch = _epoch_text(self._meta_or_none(which, e.step))
      target = move_aside(e.folder, os.path.join(self.root, DAMAGED_DIR, f'{which}-{e.step}'))
      moves.append(f'{e.folder}{f" ({epoch})" if epoch else ""} cannot be read ({e.cause}); it is kept, '
                   f'moved to {target}')
    self.managers[which].reload()
    log.warning('Damaged %s checkpoint%s: %s (nothing is deleted). %s', which,
                's' if len(damaged) > 1 else '', '; '.join(moves), then)

  def _newest_intact(self, which: str, template: Any, step: Optional[int],
                     if_lost: Optional[str]) -> Optional[Tuple[Any, dict]]:
    self.wait()
    if step is not None:
      return self._read(which, step, template)
    damaged: List[DamagedCheckpointError] = []
    for s in sorted(self.managers[which].all_steps(), reverse=True):
      try:
        found = self._read(which, s, template)
      except DamagedCheckpointError as e:
        damaged.append(e)
        continue
      if damaged:
        where = f'{self.folder(which, s)} (step {s}, {_epoch_text(found[1]) or "epoch unknown"})'
        self._set_aside(which, damaged, (
            f'The run resumes from the newest intact checkpoint, {where}, and trains the epochs after it '
            'again.' if which == 'latest' else f'The newest intact one is used instead: {where}.'))
      return found
    if not damaged:
      return None
    if if_lost is not None:
      self._set_aside(which, damaged, if_lost)
      return None
    listed = '; '.join(f'{e.folder} ({e.cause})' for e in damaged)
    directory = self.managers[which].directory
    raise DamagedCheckpointError(
        f'No checkpoint in {directory} can be read: {listed}. Nothing was moved or deleted. The run cannot '
        f'resume from them, and starting afresh beside what they leave (the best checkpoint, metrics.jsonl) '
        f'would mix two runs: move {self.root} away (e.g. to {self.root}.damaged) to start this run afresh '
        'in the same workdir, or use a new --workdir.',
        folder=damaged[0].folder, step=damaged[0].step, cause=damaged[0].cause)

  def close(self) -> None:
    """Waits for the saves in flight, then closes the managers."""
    self.wait()
    for manager in self.managers.values():
      manager.close()


# -- folders of variables (converted checkpoints, the pre-trained FE cache) ---------------------------------

def has_variables(directory: str) -> bool:
  """Whether `directory` looks like a folder written by `save_variables` (items 'variables' and 'meta')."""
  return all(os.path.isdir(os.path.join(directory, item)) for item in ('variables', 'meta'))


def save_variables(directory: str, variables: Any, meta: dict) -> str:
  """Writes `variables` (a host pytree) and `meta` (JSON-serialisable) as one Orbax checkpoint folder
  (items 'variables', 'meta'); the folder appears complete or not at all. Returns its absolute path."""
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                                         meta=ocp.args.JsonSave(meta)))
  return directory


def restore_variables(directory: str, template: Any = None) -> Tuple[Any, dict]:
  """(variables, meta) of a folder written by `save_variables`, as numpy arrays (shaped like `template` if
  given). Raises DamagedCheckpointError if its files cannot be read."""
  directory = os.path.abspath(os.path.expanduser(directory))
  with _reading(directory):
    verify_item(os.path.join(directory, 'variables'))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(directory, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
  variables = jax.tree_util.tree_map(np.asarray, restored['variables'])
  if template is not None:
    _check_shapes(directory, template, variables)
  return variables, dict(restored['meta'])
