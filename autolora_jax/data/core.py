"""What every data set shares: the batch contract, the seeded splits and orders, and the class checks.

Every data set (memory.ArrayDataset, dataset.ImageDataset) serves the same small interface, so the
training loop knows no data set:

* ``num_classes``, ``num_examples(split)``, ``steps_per_epoch(global_batch)``;
* ``train_batches(epoch, global_batch, start_step=0)``: shuffled, drop-remainder batches of the epoch,
  the order `epoch_order(seed, epoch, n)`;
* ``eval_batches(split, global_batch)``: every example exactly once, in order, the last batch padded with
  zeros and masked.

A batch (`Batch`) is a dict of numpy arrays holding this process's rows (`process_rows`) of the global batch:
``image`` uint8 (n, H, W, C) (the steps scale it to [0, 1] on the device, `to_unit`: a quarter of the bytes
to copy and send) or float32 (n, H, W, C) in [0, 1], ``label`` int32 (n,), ``index`` int32 (n,) the row's position in
the global batch (used to draw per-example attack noise independent of the device count) and, for
evaluation, ``mask`` float32 (n,) that is 0 on padding.

Augmentation is per example, a `TrainTransform` `(record, rng) -> image` called with
`example_rng(seed, epoch, position)`, position being the example's place in the epoch's order. Neither the
order nor the augmentation depends on the process count, the thread count or where a resumed epoch starts.

This module imports nothing else of the package's data modules.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from autolora_jax.errors import ConfigError

Batch = Dict[str, np.ndarray]
# (record, rng) -> image (H, W, C): one training example's augmentation, every random number from `rng`.
TrainTransform = Callable[[object, np.random.Generator], np.ndarray]


def to_unit(images: np.ndarray) -> np.ndarray:
  """Images in [0, 1] as float32: uint8 ones times float32(1 / 255) (what the steps do on the device to a
  uint8 batch, bit for bit); float ones as they are (float32)."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) * np.float32(1.0 / 255.0)
  return images.astype(np.float32, copy=False)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of range(n) that epoch `epoch` visits (a function of seed and epoch alone)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The random numbers that augment the example at `position` of epoch `epoch`'s order."""
  return np.random.default_rng([seed, epoch, position])


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that one process feeds to its devices."""
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} does not divide over {process_count} processes.')
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


def split_off(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Seeded split of range(n) into sorted (kept, taken) index arrays, round(fraction * n) of them taken."""
  perm = np.random.default_rng(seed).permutation(n)
  n_taken = int(round(fraction * n))
  return np.sort(perm[n_taken:]), np.sort(perm[:n_taken])


def per_class_limit(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
  """Sorted indices of a seeded subset with at most `limit` examples of each class (limit 0: all of them).

  Each class's subset is drawn from (seed, class) alone, so it does not depend on the other classes.
  """
  labels = np.asarray(labels)
  if not limit:
    return np.arange(len(labels))
  keep = [np.zeros(0, np.int64)]
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) > limit:
      idx = np.random.default_rng([int(seed), 7, int(c)]).permutation(idx)[:limit]
    keep.append(idx)
  return np.sort(np.concatenate(keep))


def select_classes(labels: np.ndarray, classes: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """(indices, labels int32) of the examples of `classes`, in their order, relabelled 0..len(classes)-1 in
  the order `classes` gives."""
  classes = [int(c) for c in classes]
  idx = np.flatnonzero(np.isin(labels, classes))
  lookup = {c: i for i, c in enumerate(classes)}
  return idx, np.array([lookup[int(c)] for c in labels[idx]], np.int32)


def check_classes(classes: Sequence[int], num_classes: Optional[int], name: str,
                  key: str = 'config.dataset.classes') -> None:
  """ConfigError unless `classes` holds distinct class indices of a data set with `num_classes` classes
  (None: not known yet, only integers >= 0 and no repeats are checked)."""
  classes = tuple(classes or ())
  if not classes:
    return
  span = f'0-{num_classes - 1}' if num_classes else '0, 1, ...'
  if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in classes):
    raise ConfigError(f'{key}={classes!r} must hold class indices (integers {span} for {name}).')
  repeated = sorted({int(c) for c in classes if classes.count(c) > 1})
  if repeated:
    raise ConfigError(f'{key}={classes!r} names the class{"es" if len(repeated) > 1 else ""} '
                      f'{", ".join(map(str, repeated))} more than once: give each class index once.')
  outside = [int(c) for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
  if outside:
    has = f'has {num_classes} classes' if num_classes is not None else 'numbers its classes from 0'
    raise ConfigError(f'{key}={classes!r}: the data set {name} {has} (indices {span}), so the class '
                      f'{"indices" if len(outside) > 1 else "index"} {", ".join(map(str, outside))} '
                      f'do{"" if len(outside) > 1 else "es"} not exist.')
