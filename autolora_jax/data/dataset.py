"""`ImageDataset`: splits of encoded images (or small decoded ones) served as batches, decoded on the fly.

It serves data/core's interface and batch contract (``image`` uint8 (n, H, W, 3), scaled to [0, 1] on the
device, ``label``, ``index``, and ``mask`` for evaluation), so the training loop knows no data set.

Determinism (core): the order of an epoch is `epoch_order(seed, epoch, n)`; the augmentation of the example
at position p of that order is drawn from `example_rng(seed, epoch, p)`. Neither depends on the process
count, the thread count or where a resumed run starts, so every process computes the same global batch and
feeds its rows.

Memory: the splits hold what the source gives (encoded bytes, file paths, or uint8 arrays for CIFAR);
only the batches in flight are decoded, by a thread pool, `prefetch` batches ahead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from autolora_jax.data.core import Batch, TrainTransform, epoch_order, example_rng, process_rows

# TrainTransform (core): (record, rng) -> uint8 (H, W, 3); EvalTransform: record -> uint8 (H, W, 3).
EvalTransform = Callable[[object], np.ndarray]


@dataclasses.dataclass
class Split:
  """One split: records (an array of bytes / paths, or uint8 images), labels int32 (N,), keys (N,) naming
  each source example (e.g. 'train/17' or 'ak47/001_0001.jpg'; equal keys mean the same example)."""
  records: np.ndarray
  labels: np.ndarray
  keys: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, idx: np.ndarray) -> 'Split':
    return Split(self.records[idx], self.labels[idx], self.keys[idx])

  @staticmethod
  def concat(splits: Sequence['Split']) -> 'Split':
    return Split(*(np.concatenate([getattr(s, f) for s in splits])
                   for f in ('records', 'labels', 'keys')))


def default_threads() -> int:
  """The decoding threads of a data set by default: the cores this process may run on (its CPU affinity,
  e.g. the share of a host's cores a scheduler gives each of its 8 GPU tasks; not os.cpu_count(), all of
  the host's), at most 32. Threads, not processes: PIL decodes and resizes without the GIL, so threads
  scale with the cores, and nothing is copied between processes (benchmarks/input_pipeline.py)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  return max(1, min(32, cores))


class ImageDataset:
  """Train / validation / test splits with per-example train and eval transforms.

  Args:
    splits: {'train', 'validation', 'test'} -> Split.
    num_classes: outputs of the model's head (labels lie in [0, num_classes)).
    train_transform, eval_transform: see the type aliases above; eval output shape is `eval_shape`.
    seed: the run's seed (order and augmentation).
    threads: decoding threads (None: `default_threads()`, the cores this process may run on, at most 32);
      0 decodes in the caller.
    prefetch: global batches decoded ahead of the one being consumed.
    cache_validation_bytes: the validation split (evaluated every epoch) keeps its decoded images if they fit.
    name: the data set's name (for messages).
  """

  def __init__(self, splits: Dict[str, Split], num_classes: int, *, train_transform: TrainTransform,
               eval_transform: EvalTransform, eval_shape: Tuple[int, int, int], seed: int = 0,
               process_index: int = 0, process_count: int = 1, threads: Optional[int] = None,
               prefetch: int = 2, cache_validation_bytes: int = 1 << 30, name: str = ''):
    self.splits = splits
    self.num_classes = int(num_classes)
    self.train_transform = train_transform
    self.eval_transform = eval_transform
    self.eval_shape = tuple(eval_shape)
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.threads = default_threads() if threads is None else threads
    self.prefetch = max(0, prefetch)
    self.name = name
    self._pool = None
    n_val = len(splits['validation'])
    self._cache: Dict[str, Optional[dict]] = {
        'validation': {} if n_val * int(np.prod(self.eval_shape)) <= cache_validation_bytes else None}

  # -- the interface -----------------------------------------------------------------------------------

  def num_examples(self, split: str) -> int:
    return len(self.splits[split])

  def steps_per_epoch(self, global_batch: int) -> int:
    return self.num_examples('train') // global_batch

  def keys(self, split: str) -> np.ndarray:
    """The source keys of a split, in its evaluation order (for checks: disjointness, coverage)."""
    return self.splits[split].keys

  def labels(self, split: str) -> np.ndarray:
    """The labels of a split (int32, all processes' examples), in its evaluation order."""
    return self.splits[split].labels.astype(np.int32)

  def examples(self, split: str, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(images as the evaluation gives them (m, H, W, C), labels (m,)) of the examples at `indices` (their
    positions in the split's evaluation order), decoded on the thread pool."""
    chosen = self.splits[split]
    cache = self._cache.get(split)
    tasks = [(self._eval_example, (chosen.records[i], cache, int(i))) for i in np.asarray(indices, np.int64)]
    images = next(self._run(iter([(tasks, {})])))['image'] if tasks else np.zeros((0,) + self.eval_shape,
                                                                                np.uint8)
    return images, chosen.labels[np.asarray(indices, np.int64)].astype(np.int32)

  def train_order(self, epoch: int) -> np.ndarray:
    """The permutation of the training split that epoch `epoch` visits (a function of seed and epoch)."""
    return epoch_order(self.seed, epoch, self.num_examples('train'))

  def train_batches(self, epoch: int, global_batch: int, start_step: int = 0) -> Iterator[Batch]:
    """Shuffled, augmented, drop-remainder batches of one epoch from step `start_step` on."""
    split = self.splits['train']
    order = self.train_order(epoch)
    rows = process_rows(global_batch, self.process_index, self.process_count)
    positions = np.arange(global_batch)[rows]

    def jobs():
      for step in range(start_step, self.steps_per_epoch(global_batch)):
        idx = order[step * global_batch + positions]
        tasks = [(self._train_example, (split.records[i], self.seed, epoch, step * global_batch + int(p)))
                 for i, p in zip(idx, positions)]
        yield tasks, {'label': split.labels[idx].astype(np.int32), 'index': positions.astype(np.int32)}

    return self._run(jobs())

  def eval_batches(self, split_name: str, global_batch: int) -> Iterator[Batch]:
    """Every example of a split once, in order; the last batch padded with zeros and masked."""
    split = self.splits[split_name]
    n = len(split)
    rows = process_rows(global_batch, self.process_index, self.process_count)
    positions = np.arange(global_batch)[rows]
    cache = self._cache.get(split_name)

    def jobs():
      for start in range(0, n, global_batch):
        idx = start + positions
        valid = idx < n
        tasks = [(self._eval_example, (split.records[i], cache, int(i))) if ok else (self._padding, ())
                 for i, ok in zip(idx, valid)]
        labels = np.where(valid, split.labels[np.minimum(idx, n - 1)], 0).astype(np.int32)
        yield tasks, {'label': labels, 'mask': valid.astype(np.float32), 'index': positions.astype(np.int32)}

    return self._run(jobs())

  # -- decoding ----------------------------------------------------------------------------------------

  def _train_example(self, record, seed: int, epoch: int, position: int) -> np.ndarray:
    return self.train_transform(record, example_rng(seed, epoch, position))

  def _eval_example(self, record, cache: Optional[dict], i: int) -> np.ndarray:
    if cache is not None and i in cache:
      return cache[i]
    image = self.eval_transform(record)
    if cache is not None:
      cache[i] = image
    return image

  def _padding(self) -> np.ndarray:
    return np.zeros(self.eval_shape, np.uint8)

  def _executor(self):
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix='decode')
    return self._pool

  @staticmethod
  def _assemble(images: Sequence[np.ndarray], extra: dict) -> Batch:
    image = np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    return {'image': image, **extra}

  @staticmethod
  def _decode_all(tasks) -> list:
    return [fn(*args) for fn, args in tasks]

  def _run(self, jobs) -> Iterator[Batch]:
    """Runs each batch's decoding tasks, `prefetch` batches ahead on the thread pool (in order), two chunks
    of the batch per thread (a few futures per batch, not one per image)."""
    if self.threads <= 0:
      for tasks, extra in jobs:
        yield self._assemble([fn(*args) for fn, args in tasks], extra)
      return
    pool = self._executor()
    pending = collections.deque()
    try:
      for tasks, extra in jobs:
        size = max(1, -(-len(tasks) // (2 * self.threads)))
        chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
        pending.append(([pool.submit(self._decode_all, chunk) for chunk in chunks], extra))
        if len(pending) > self.prefetch:
          futures, extra_ = pending.popleft()
          yield self._assemble([image for f in futures for image in f.result()], extra_)
      while pending:
        futures, extra_ = pending.popleft()
        yield self._assemble([image for f in futures for image in f.result()], extra_)
    finally:  # an abandoned epoch (preemption, error) leaves no work queued
      for futures, _ in pending:
        for f in futures:
          f.cancel()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
