"""Host-side pieces of the training loop shared by fine-tuning and pre-training.

They own the devices and the host: splitting batches over local devices, running a pmapped train step
over an epoch with a progress bar and a guard against non-finite losses, and summing evaluation counts.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Dict, Iterable, Iterator, NamedTuple, Optional

import jax
import numpy as np
import tqdm
from flax import jax_utils

from autolora_jax import steps
from autolora_jax.errors import NonFiniteLossError


def pmap_train_step(train_step: Callable) -> Callable:
  """pmaps `train_step(state, batch, rng)`: state and batch split over local devices, one rng for all."""
  return jax.pmap(train_step, axis_name=steps.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


def pmap_eval_step(eval_step: Callable) -> Callable:
  """pmaps `eval_step(state, batch)` over local devices."""
  return jax.pmap(eval_step, axis_name=steps.AXIS)


@functools.partial(jax.pmap, axis_name=steps.AXIS)
def _canonical(tree):
  return tree


def replicate(tree):
  """A copy of `tree` on every local device, placed as pmapped steps return their outputs.

  (jax_utils.replicate alone places arrays on a differently named device mesh, and a pmapped step
  retraces and recompiles when its inputs switch between the two placements.)
  """
  return _canonical(jax_utils.replicate(tree))


def shard(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Reshapes this process's rows (n, ...) to (local_devices, n / local_devices, ...) for pmap."""
  n_dev = jax.local_device_count()
  return jax.tree_util.tree_map(lambda a: a.reshape((n_dev, -1) + a.shape[1:]), batch)


def device_batches(batches: Iterable[Dict[str, np.ndarray]], prefetch: int = 2) -> Iterator:
  """Sharded batches, `prefetch` of them already on the devices."""
  return jax_utils.prefetch_to_device(map(shard, batches), prefetch)


def step_rng(seed: int, epoch: int, step: int):
  """The PRNG key of one train step, a function of (seed, epoch, step) alone: resumable, device-independent."""
  key = jax.random.PRNGKey(seed)
  return jax.random.fold_in(jax.random.fold_in(key, epoch), step)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = 'img'):
  return tqdm.tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=True,
                   disable=not enabled, mininterval=0.5)


class EpochReport(NamedTuple):
  """How an epoch (or the part of it run) went.

  Attributes:
    steps: train steps run, over the whole epoch when resumed from `carry`.
    seconds, images_per_second: wall time of those steps and the training throughput.
    stopped_at: None when the epoch ran to its end, else the step index to resume from (a preemption).
    carry: {'sums', 'steps', 'seconds'} (JSON data): what a resumed part of the epoch goes on from.
  """
  steps: int
  seconds: float
  images_per_second: float
  stopped_at: Optional[int]
  carry: dict


def train_epoch(p_train_step: Callable, state, batches: Iterable[Dict[str, np.ndarray]], *, seed: int,
                epoch: int, steps: int, global_batch: int, start_step: int = 0, progress: bool = True,
                desc: str = '', on_step: Optional[Callable] = None, carry: Optional[dict] = None):
  """Runs the pmapped train step over one epoch's batches.

  Metrics are read one step behind (so one step stays in flight) and checked for NaN/inf.
  `on_step(state, step)` runs after each step (e.g. to check for a preemption request); if it returns
  True the epoch stops early. `carry` is the `EpochReport.carry` of an earlier, stopped part of the same
  epoch (`start_step` = its `stopped_at`): the sums go on from it, so the means cover the whole epoch exactly.

  Returns:
    (state, mean metrics over the steps run, EpochReport).
  """
  carry = carry or {}
  sums: Dict[str, float] = dict(carry.get('sums', {}))
  n_done = int(carry.get('steps', 0))
  pending = None
  start = time.time() - float(carry.get('seconds', 0.0))
  bar = progress_bar((steps - start_step) * global_batch, desc or f'epoch {epoch}', progress)

  def collect(metrics, step):
    nonlocal n_done
    values = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(v) for v in values.values()):
      bad = {k: v for k, v in values.items() if not math.isfinite(v)}
      raise NonFiniteLossError(
          f'Non-finite training metrics {bad} at epoch {epoch}, step {step} (0-based within the epoch). The '
          'run stopped before saving this state: the last good checkpoint is kept. Check the data and the '
          'pre-trained weights; running the same command again resumes from that checkpoint. To change the '
          'config instead (e.g. a lower auto_lr.lr0), use a new --workdir or --overwrite.')
    for k, v in values.items():
      sums[k] = sums.get(k, 0.0) + v
    n_done += 1

  stopped_at = None
  try:
    for step, batch in enumerate(device_batches(batches), start=start_step):
      state, metrics = p_train_step(state, batch, step_rng(seed, epoch, step))
      if pending is not None:
        collect(*pending)
        bar.update(global_batch)
        bar.set_postfix(loss=f"{sums['loss'] / n_done:.3f}", refresh=False)
      pending = (metrics, step)
      if on_step is not None and on_step(state, step):
        stopped_at = step + 1
        break
    if pending is not None:
      collect(*pending)
      bar.update(global_batch)
  finally:
    bar.close()
  seconds = time.time() - start
  means = {k: v / max(n_done, 1) for k, v in sums.items()}
  report = EpochReport(steps=n_done, seconds=seconds,
                       images_per_second=n_done * global_batch / seconds if seconds > 0 else 0.0,
                       stopped_at=stopped_at, carry={'sums': dict(sums), 'steps': n_done, 'seconds': seconds})
  return state, means, report


def evaluate(p_eval_step: Callable, state, batches: Iterable[Dict[str, np.ndarray]], *, total: int,
             global_batch: int, progress: bool = False, desc: str = 'eval') -> Dict[str, float]:
  """Sums the pmapped eval step's counts over a split; returns accuracies (fractions) and 'count'."""
  sums: Dict[str, float] = {}
  bar = progress_bar(total, desc, progress)
  try:
    for batch in device_batches(batches):
      counts = jax.device_get(p_eval_step(state, batch))
      for k, v in counts.items():
        sums[k] = sums.get(k, 0.0) + float(v[0])
      bar.update(min(global_batch, total - bar.n))
  finally:
    bar.close()
  count = sums.pop('count', 0.0)
  out = {k: v / count if count else float('nan') for k, v in sums.items()}
  out['count'] = int(count)
  return out
