"""Every data set, behind one entry point: `create_dataset(config.dataset, seed=...)`.

The modules, each depending only on those above it:

* `core`: the batch contract and the interface every data set serves, seeded splits and orders
  (`split_off`, `per_class_limit`, `epoch_order`, `example_rng`), per-process rows, the class checks;
* `transforms`: docs/method.md's per-data-set preprocessing (torchvision's rules, numpy random numbers);
* `dataset`: `ImageDataset`, the batches of encoded images (deterministic order and augmentation,
  per-process rows, decoding in a thread pool);
* `folder`: image folders: your own images (`folder`) and the scanning Caltech-256 shares;
* `sources`: the table of all data sets, the TFDS and Caltech-256 readers, their splits and the clear
  errors when one is not prepared;
* `fashion_mnist`: Fashion-MNIST from TFDS or the original idx files;
* `memory`: `ArrayDataset` and the in-memory data sets (`mnist5k`, `digits`, `fashion_mnist`);
* this package: the registry (`DATASETS`, `NUM_CLASSES`, the class-count look-ups and checks) and
  `create_dataset`.
"""

from __future__ import annotations

from typing import Optional, Union

from autolora_jax.data import folder, memory, sources
from autolora_jax.data.core import check_classes
from autolora_jax.data.dataset import ImageDataset
from autolora_jax.data.memory import ArrayDataset
from autolora_jax.errors import DataError

# In memory: 'mnist5k' (5,000 real MNIST digits), 'digits' (8x8, the demo and tests) and 'fashion_mnist'
# (data/memory.py). The paper's six data sets and 'folder' (your own images) are ImageDatasets (see the
# table in data/sources.py).
DATASETS = ('mnist5k', 'digits', 'fashion_mnist', 'cifar10', 'cifar100', 'dtd', 'stanford_dogs',
            'caltech_birds2011', 'caltech256', 'folder')
# The class counts of the in-memory data sets.
NUM_CLASSES = memory.NUM_CLASSES


def known_num_classes(name: str) -> Optional[int]:
  """The class count of a data set known without reading it; None for folders (and unknown names)."""
  if name in NUM_CLASSES:
    return NUM_CLASSES[name]
  spec = sources.SPECS.get(name) if name in DATASETS else None
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


def create_dataset(data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                   reference_compat: bool = False,
                   threads: Optional[int] = None) -> Union[ArrayDataset, ImageDataset]:
  """The data set `config.dataset` names, split into train / validation / test (core's interface).

  The test split is the data set's own (digits, mnist5k: a seeded `test_fraction`, `split_seed`, in a
  seeded order; a folder of class folders: a seeded `test_fraction` of each class); `train_per_class_limit`
  keeps a seeded subset of at most that many examples of each class of the training pool; the validation
  split is then a seeded `val_fraction` of the training pool (never taken from test) and is evaluated with
  test-time preprocessing. A fraction of 0 leaves that split empty (e.g. for pre-training on all of a data
  set). `reference_compat` reproduces the authors' public code's splits (docs/method.md, items 4 and 7; see
  data/sources.py). `threads`: an ImageDataset's decoding threads (None: dataset.default_threads()).
  Raises DataError / ConfigError, before any model is built, for an unknown data set, one
  that is not prepared or malformed, and class indices it does not have.
  """
  name = data_config.name
  if name not in DATASETS:
    raise _unknown(name)
  kwargs = dict(seed=seed, process_index=process_index, process_count=process_count)
  if name in NUM_CLASSES:
    return memory.create(data_config, **kwargs)
  return sources.create(data_config, reference_compat=reference_compat, threads=threads, **kwargs)
