"""Orbax checkpoints of a run: the latest state and the best model, kept in separate managers.

    workdir/checkpoints/latest/<step>/   full TrainState + JSON metadata (epoch, scheduler, scalars, ...)
    workdir/checkpoints/best/<step>/     {'params', 'batch_stats'} + JSON metadata (epoch, val metrics)

Keeping them apart means the best-keeping policy can never delete the latest state (and vice versa).
Checkpoint ids are global optimizer steps. States are saved and restored as host numpy arrays,
unreplicated; the caller replicates them over its devices.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from flax import jax_utils


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'meta'))


def host_copy(tree, replicated: bool):
  """The tree as host numpy arrays; the first replica of a pmap-replicated tree."""
  return jax.device_get(jax_utils.unreplicate(tree) if replicated else tree)


class Checkpoints:
  """The 'latest' and 'best' checkpoint managers of one workdir."""

  def __init__(self, workdir: str, keep_latest: int = 2):
    root = os.path.join(workdir, 'checkpoints')
    self.managers = {'latest': _manager(os.path.join(root, 'latest'), keep_latest),
                     'best': _manager(os.path.join(root, 'best'), 1)}

  def latest_step(self, which: str = 'latest') -> Optional[int]:
    return self.managers[which].latest_step()

  def save(self, which: str, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (a host pytree) and `meta` (JSON-serialisable) under id `step`, synchronously."""
    manager = self.managers[which]
    if step in manager.all_steps():  # e.g. re-saving 'latest' at the same step after a best reload
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()

  def restore(self, which: str, template: Any, step: Optional[int] = None) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of checkpoint `step` (default: the newest) shaped like `template`; None if none."""
    manager = self.managers[which]
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def restore_meta(self, which: str, step: Optional[int] = None) -> Optional[dict]:
    """Only the JSON metadata of a checkpoint (cheap); None if there is none."""
    manager = self.managers[which]
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def close(self) -> None:
    for manager in self.managers.values():
      manager.close()
