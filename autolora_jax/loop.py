"""Host-side pieces of the training loop shared by fine-tuning and pre-training.

They own the devices and the host: splitting batches over local devices and putting them there from a
background thread (`DeviceFeeder`), running a pmapped train step over an epoch with a progress bar and a
guard against non-finite losses, and summing metrics and evaluation counts on the devices (`DeviceSums`),
so that the host reads them every few steps instead of waiting on every one.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
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


@functools.lru_cache(maxsize=None)
def _leading_axis_sharding(n_dev: int):
  """The placement of pmapped steps' outputs: the leading axis over the local devices (one per shard)."""
  del n_dev  # a key of the cache only
  return _canonical(np.zeros((jax.local_device_count(),), np.uint8)).sharding


def to_devices(batch: Dict[str, np.ndarray]) -> dict:
  """One batch sharded over the local devices, in the placement pmapped steps expect (one copy per row
  block, no host-side stacking); uint8 images travel as uint8."""
  sharding = _leading_axis_sharding(jax.local_device_count())
  return jax.device_put(shard(batch), sharding)


_DONE = object()


class _Failed(NamedTuple):
  error: BaseException


class DeviceFeeder:
  """Iterates the batches of `batches` already on the local devices, put there by a background thread
  that runs `depth` batches ahead (decoding, assembly and the transfer overlap the steps).

  The order is the iterator's. `close()` (or leaving a `with` block) stops the thread and closes the
  iterator (an abandoned epoch leaves no decoding queued); an error of the iterator is raised in the
  consumer at the batch where it happened.
  """

  def __init__(self, batches: Iterable[Dict[str, np.ndarray]], depth: int = 2):
    self._source = iter(batches)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._feed, name='device-feeder', daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _feed(self) -> None:
    try:
      for batch in self._source:
        if not self._put(to_devices(batch)):
          break
      else:
        self._put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except (handed to the consumer)
      self._put(_Failed(e))
    finally:
      close = getattr(self._source, 'close', None)
      if close is not None:
        close()

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is _DONE:
      self._queue.put(_DONE)  # stays exhausted
      raise StopIteration
    if isinstance(item, _Failed):
      raise item.error
    return item

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass
    self._thread.join()

  def __enter__(self) -> 'DeviceFeeder':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def device_batches(batches: Iterable[Dict[str, np.ndarray]], prefetch: int = 2) -> DeviceFeeder:
  """Sharded batches on the devices, `prefetch` of them put there ahead by a background thread."""
  return DeviceFeeder(batches, prefetch)


@functools.partial(jax.pmap, axis_name=steps.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
def _add(sums, values, step):
  """sums + values per key, and the first step whose values were not all finite (int32 max if none)."""
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(values)]))
  first_bad = jnp.where(finite, sums['first_bad'], jnp.minimum(sums['first_bad'], step))
  return {'first_bad': first_bad,
          'sums': jax.tree_util.tree_map(lambda s, v: s + v.astype(s.dtype), sums['sums'], values)}


class DeviceSums:
  """Running sums of the per-step outputs of a pmapped step (metrics or counts, equal on every device),
  kept on the devices: adding dispatches a small program and never waits; `read()` waits for the sums.

  Sums are float32, added in step order (a resumed epoch that starts from the sums `read()` gave adds
  exactly what an uninterrupted one does).
  """

  _NONE = np.iinfo(np.int32).max

  def __init__(self, initial: Optional[Dict[str, float]] = None):
    self._initial = {k: float(v) for k, v in (initial or {}).items()}
    self._state = None

  def add(self, values: dict, step: int = 0) -> None:
    if self._state is None:
      n_dev = jax.local_device_count()
      zeros = {k: np.full((n_dev,), self._initial.get(k, 0.0), np.float32) for k in values}
      self._state = jax.device_put({'first_bad': np.full((n_dev,), self._NONE, np.int32), 'sums': zeros},
                                   _leading_axis_sharding(n_dev))
    self._state = _add(self._state, values, np.int32(step))

  def read(self) -> Tuple[Dict[str, float], Optional[int]]:
    """(the sums as Python floats, the first step whose values were not finite or None); waits for them."""
    if self._state is None:
      return dict(self._initial), None
    host = jax.device_get(self._state)
    first_bad = int(host['first_bad'][0])
    return {k: float(v[0]) for k, v in host['sums'].items()}, (None if first_bad == self._NONE else first_bad)


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
                desc: str = '', on_step: Optional[Callable] = None, carry: Optional[dict] = None,
                metrics_every: int = 10, prefetch: int = 2):
  """Runs the pmapped train step over one epoch's batches.

  The batches reach the devices from a background thread, `prefetch` steps ahead (`DeviceFeeder`). The
  metrics are summed on the devices (`DeviceSums`) and read every `metrics_every` steps (one step behind,
  so the device stays busy) and at the end: the progress bar's loss and the check for NaN/inf, which names
  the first step whose metrics were not finite. `on_step(state, step)` runs after each step is dispatched
  (e.g. to check for a preemption request, on the host only); if it returns True the epoch stops early.
  `carry` is the `EpochReport.carry` of an earlier, stopped part of the same epoch (`start_step` = its
  `stopped_at`): the sums go on from it, so the means cover the whole epoch exactly.

  Returns:
    (state, mean metrics over the steps run, EpochReport).
  """
  carry = carry or {}
  sums = DeviceSums(carry.get('sums'))
  n_before = int(carry.get('steps', 0))
  n_run = 0
  start = time.time() - float(carry.get('seconds', 0.0))
  bar = progress_bar((steps - start_step) * global_batch, desc or f'epoch {epoch}', progress)

  def check(values: Dict[str, float], first_bad: Optional[int]) -> None:
    if first_bad is not None:
      raise NonFiniteLossError(
          f'Non-finite training metrics at epoch {epoch}, step {first_bad} (0-based within the epoch; sums '
          f'read then: {values}). The run stopped before saving this state: the last good checkpoint is '
          'kept. Check the data and the pre-trained weights; running the same command again resumes from '
          'that checkpoint. To change the config instead (e.g. a lower auto_lr.lr0), use a new --workdir '
          'or --overwrite.')

  stopped_at = None
  feeder = device_batches(batches, prefetch)
  try:
    for step, batch in enumerate(feeder, start=start_step):
      state, metrics = p_train_step(state, batch, step_rng(seed, epoch, step))
      if n_run and n_run % max(1, metrics_every) == 0:  # the sums of the steps before this one
        values, first_bad = sums.read()
        check(values, first_bad)
        bar.set_postfix(loss=f"{values['loss'] / (n_before + n_run):.3f}", refresh=False)
      sums.add(metrics, step)
      n_run += 1
      bar.update(global_batch)
      if on_step is not None and on_step(state, step):
        stopped_at = step + 1
        break
    values, first_bad = sums.read()
    check(values, first_bad)
  finally:
    feeder.close()
    bar.close()
  seconds = time.time() - start
  n_done = n_before + n_run
  means = {k: v / max(n_done, 1) for k, v in values.items()}
  report = EpochReport(steps=n_done, seconds=seconds,
                       images_per_second=n_done * global_batch / seconds if seconds > 0 else 0.0,
                       stopped_at=stopped_at, carry={'sums': dict(values), 'steps': n_done, 'seconds': seconds})
  return state, means, report


def evaluate(p_eval_step: Callable, state, batches: Iterable[Dict[str, np.ndarray]], *, total: int,
             global_batch: int, progress: bool = False, desc: str = 'eval') -> Dict[str, float]:
  """Sums the pmapped eval step's counts over a split on the devices (read once, at the end); returns
  accuracies (fractions) and 'count'."""
  counts = DeviceSums()
  bar = progress_bar(total, desc, progress)
  feeder = device_batches(batches)
  try:
    for batch in feeder:
      counts.add(p_eval_step(state, batch))
      bar.update(min(global_batch, total - bar.n))
    sums, _ = counts.read()
  finally:
    feeder.close()
    bar.close()
  count = sums.pop('count', 0.0)
  out = {k: v / count if count else float('nan') for k, v in sums.items()}
  out['count'] = int(count)
  return out
