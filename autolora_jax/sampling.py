"""Which test points an evaluation on N of them uses: a seeded sample stratified by class, or the first N.

Folder and Caltech-256 test splits are in class order, so their first N points cover one or two classes; a
stratified sample gives every class its share (largest remainders), so that a number measured on N points
describes the whole split. The sample is a function of the labels, N and the seed alone: the same indices
for every checkpoint, method and seed of a comparison, whatever the batch size, device or process count.
"""

from __future__ import annotations

from typing import Tuple

import jax
import numpy as np

POINT_SAMPLES = ('stratified', 'first')


def class_shares(counts: np.ndarray, n: int) -> np.ndarray:
  """How many of n points each class gets: its share of n, rounded by largest remainders (ties to the
  lower class index), never more than the class holds."""
  counts = np.asarray(counts, np.int64)
  total = int(counts.sum())
  exact = counts * n / total
  shares = np.floor(exact).astype(np.int64)
  order = np.lexsort((np.arange(len(counts)), -(exact - shares)))  # largest remainder first
  for c in order[:n - int(shares.sum())]:
    shares[c] += 1
  return np.minimum(shares, counts)


def sample_points(labels: np.ndarray, n: int, seed: int = 0, how: str = 'stratified') -> np.ndarray:
  """Sorted positions (int64) of the n points of a split with `labels` that an evaluation uses.

  Args:
    labels: (N,) the split's labels in its evaluation order.
    n: how many points; 0 or n >= N: all of them.
    seed: the sample's seed ('stratified').
    how: 'stratified' (every class in proportion, a seeded choice within each class) or 'first'.
  """
  if how not in POINT_SAMPLES:
    raise ValueError(f'how must be one of {POINT_SAMPLES}, got {how!r}.')
  labels = np.asarray(labels)
  total = len(labels)
  if n <= 0 or n >= total:
    return np.arange(total, dtype=np.int64)
  if how == 'first':
    return np.arange(n, dtype=np.int64)
  classes, inverse = np.unique(labels, return_inverse=True)
  shares = class_shares(np.bincount(inverse, minlength=len(classes)), n)
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(shares)]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_of(data, split: str, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """This process's share of the points at `indices` (positions in the split, all processes'): (images as
  the data set's evaluation gives them (m, H, W, C), labels (m,), their positions (m,)); process p takes
  indices[p::count]."""
  local = np.asarray(indices)[jax.process_index()::jax.process_count()]
  x, y = data.examples(split, local)
  return x, y, local.astype(np.int32)


def point_batches(x: np.ndarray, y: np.ndarray, total: int, global_batch: int):
  """Masked evaluation batches of this process's points (x, y), `total` points over all processes: every
  process yields the same number of batches of global_batch / process_count rows (the last ones padded)."""
  count = jax.process_count()
  rows = global_batch // count
  per_process = -(-total // count)
  for b in range(max(1, -(-per_process // rows))):
    xb, yb = x[b * rows:(b + 1) * rows], y[b * rows:(b + 1) * rows]
    m = len(yb)
    pad = rows - m
    image = np.concatenate([xb, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else xb
    yield {'image': image, 'label': np.concatenate([yb, np.zeros(pad, np.int32)]),
           'mask': (np.arange(rows) < m).astype(np.float32), 'index': np.arange(rows, dtype=np.int32)}
