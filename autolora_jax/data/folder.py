"""Image folders: your own images (`config.dataset.name='folder'`) and the scanning Caltech-256 shares.

Two layouts of `config.dataset.data_dir` (DIR) are read:

* ``DIR/train/<class>/<image>`` and ``DIR/test/<class>/<image>``: the test split is DIR/test;
* ``DIR/<class>/<image>``: a seeded `config.dataset.test_fraction` of each class is the test split.

Classes are the sorted names of the class folders (of DIR/train in the first layout), labels 0, 1, ... in
that order. Validation is a seeded `val_fraction` of the training split, as for every data set.
`config.dataset.preprocess` picks the preprocessing: 'imagenet' (resize 256, crop 224) or 'cifar' (small
images of one size, kept at that size: pad-4 random crop and flip).

Everything is checked when the data set is created, before any model is built; each problem is a
`DataError` paragraph that names the folder or file: a missing folder, no class folders, fewer than two
classes, an empty class, a file that is not an image (by extension, then by its header read with PIL
without decoding the pixels), train and test folders with different classes, and with 'cifar' an image
whose size differs from the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from autolora_jax.data.core import split_off
from autolora_jax.data.dataset import Split
from autolora_jax.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# Files that image folders often hold besides images (left there by file managers): skipped.
IGNORED_FILES = ('thumbs.db', 'desktop.ini')
PREPROCESS = ('imagenet', 'cifar')
LAYOUT_HELP = ('Expected DIR/train/<class>/<image> with DIR/test/<class>/<image>, or DIR/<class>/<image> with '
               '--config.dataset.test_fraction=0.2 (see docs/checkpoints_and_data.md, "Your own images").')


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _ignored(name: str) -> bool:
  return name.startswith('.') or name.lower() in IGNORED_FILES


def lenient_class_folders(root: str) -> Optional[Dict[str, List[str]]]:
  """{class folder: sorted image file names} if `root` looks like root/<class>/<image>, else None.

  Lenient (Caltech-256's search for its root): files without an image extension are skipped, empty
  folders are no class, and fewer than two classes means "not this folder".
  """
  if not os.path.isdir(root):
    return None
  classes = {}
  for entry in sorted(os.scandir(root), key=lambda e: e.name):
    if entry.is_dir():
      files = sorted(f.name for f in os.scandir(entry.path) if f.is_file() and is_image_name(f.name))
      if files:
        classes[entry.name] = files
  return classes if len(classes) >= 2 else None


def class_folder_names(root: str) -> List[str]:
  """The sorted names of the sub-folders of `root` (hidden ones skipped)."""
  return sorted(e.name for e in os.scandir(root) if e.is_dir() and not _ignored(e.name))


@dataclasses.dataclass
class ScannedFolder:
  """One checked root/<class>/<image> tree: class names and, per class, (file name, (width, height))."""
  root: str
  classes: List[str]
  files: Dict[str, List[Tuple[str, Tuple[int, int]]]]

  def counts(self) -> List[int]:
    return [len(self.files[c]) for c in self.classes]


def _check_image(path: str) -> Tuple[int, int]:
  """The (width, height) of an image file, from its header (the pixels are not decoded)."""
  try:
    with Image.open(path) as image:
      return image.size
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise DataError(f'The file {path} is not an image PIL can read ({type(e).__name__}: {e}). Remove it from '
                    'the class folder or replace it with a readable image.') from None


def scan_class_folders(root: str, what: str = 'The image folder') -> ScannedFolder:
  """Checks root/<class>/<image> strictly and returns it; DataError names the first problem found."""
  if not os.path.isdir(root):
    raise DataError(f'{what} {root} does not exist or is not a folder. {LAYOUT_HELP}')
  classes = class_folder_names(root)
  if not classes:
    raise DataError(f'{what} {root} has no class sub-folders (one folder of images per class). {LAYOUT_HELP}')
  files = {}
  for name in classes:
    folder = os.path.join(root, name)
    entries = sorted((e for e in os.scandir(folder) if not _ignored(e.name)), key=lambda e: e.name)
    subfolders = [e.name for e in entries if e.is_dir()]
    if subfolders:
      raise DataError(f'The class folder {folder} holds sub-folders ({", ".join(subfolders[:5])}): a class '
                      f'folder holds its images directly. {LAYOUT_HELP}')
    found = []
    for e in entries:
      path = os.path.join(folder, e.name)
      if not is_image_name(e.name):
        raise DataError(f'The file {path} is not an image (its extension is not one of '
                        f'{", ".join(IMAGE_EXTENSIONS)}). Class folders may hold only images: move it elsewhere.')
      found.append((e.name, _check_image(path)))
    if not found:
      raise DataError(f'The class {name!r} ({folder}) has no images: add images or remove the folder.')
    files[name] = found
  return ScannedFolder(root, classes, files)


def find_layout(data_dir: str) -> Tuple[str, bool]:
  """(root, split): split is True for DIR/train + DIR/test, False for DIR/<class>."""
  if not data_dir:
    raise DataError('config.dataset.name=folder reads your own images from config.dataset.data_dir, which is '
                    f'empty: pass --config.dataset.data_dir=DIR. {LAYOUT_HELP}')
  root = os.path.expanduser(data_dir)
  if not os.path.isdir(root):
    raise DataError(f'The image folder {root} (config.dataset.data_dir) does not exist or is not a folder. '
                    f'{LAYOUT_HELP}')
  has_train, has_test = (os.path.isdir(os.path.join(root, s)) for s in ('train', 'test'))
  if has_train != has_test:
    there, missing = ('train', 'test') if has_train else ('test', 'train')
    raise DataError(f'The image folder {root} has a {there}/ folder but no {missing}/ folder: give both '
                    f'({root}/train/<class>/<image> and {root}/test/<class>/<image>), or put the class folders '
                    f'directly in {root} and set --config.dataset.test_fraction (e.g. 0.2).')
  return root, has_train


def class_count(data_dir: str) -> int:
  """The number of classes of an image folder (its layout checked, its files not)."""
  root, split = find_layout(data_dir)
  classes = class_folder_names(os.path.join(root, 'train') if split else root)
  if len(classes) < 2:
    scan_class_folders(os.path.join(root, 'train') if split else root)  # the precise error, if any
    raise _too_few(root, classes)
  return len(classes)


def _too_few(root: str, classes: Sequence[str]) -> DataError:
  return DataError(f'The image folder {root} has {len(classes)} class folder{"" if len(classes) == 1 else "s"} '
                   f'({", ".join(classes) or "none"}): a classifier needs at least 2.')


def _records(scanned: ScannedFolder, prefix: str) -> Split:
  paths, labels, keys = [], [], []
  for label, name in enumerate(scanned.classes):
    for f, _ in scanned.files[name]:
      paths.append(os.path.join(scanned.root, name, f))
      keys.append(f'{prefix}{name}/{f}')
      labels.append(label)
  records = np.empty(len(paths), dtype=object)
  records[:] = paths
  return Split(records, np.asarray(labels, np.int32), np.array(keys, dtype=str))


def _check_one_size(scans: Sequence[ScannedFolder]) -> Tuple[int, int]:
  """The (width, height) all images share (preprocess 'cifar'); DataError names one that differs."""
  first = None
  for scanned in scans:
    for name in scanned.classes:
      for f, size in scanned.files[name]:
        if first is None:
          first = (os.path.join(scanned.root, name, f), size)
        elif size != first[1]:
          raise DataError(
              f'config.dataset.preprocess=cifar keeps images at their own size, so all images of the folder '
              f'must have one size, but {os.path.join(scanned.root, name, f)} is {size[0]}x{size[1]} while '
              f'{first[0]} is {first[1][0]}x{first[1][1]}. Resize them to one size, or use '
              '--config.dataset.preprocess=imagenet (resize 256, crop 224).')
  return first[1]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Seeded (kept, taken) sorted indices: round(fraction * n_c) of each class c taken."""
  kept, taken = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    k, t = split_off(len(idx), fraction, seed + int(c))
    kept.append(idx[k])
    taken.append(idx[t])
  return np.sort(np.concatenate(kept)), np.sort(np.concatenate(taken))


def load(data_dir: str, preprocess: str, test_fraction: float,
         split_seed: int) -> Tuple[Split, Split, List[str], Optional[Tuple[int, int]]]:
  """(training pool, test, class names, the one (width, height) with preprocess 'cifar' else None)."""
  if preprocess not in PREPROCESS:
    raise DataError(f'config.dataset.preprocess={preprocess!r} is not supported: choose one of {PREPROCESS}.')
  root, split = find_layout(data_dir)
  if split:
    train = scan_class_folders(os.path.join(root, 'train'), 'The training folder')
    test = scan_class_folders(os.path.join(root, 'test'), 'The test folder')
    if train.classes != test.classes:
      only_train = sorted(set(train.classes) - set(test.classes))
      only_test = sorted(set(test.classes) - set(train.classes))
      raise DataError(f'The class folders of {train.root} and {test.root} differ: only in train: '
                      f'{", ".join(only_train) or "none"}; only in test: {", ".join(only_test) or "none"}. '
                      'Both must hold the same classes.')
    if len(train.classes) < 2:
      raise _too_few(root, train.classes)
    scans = [train, test]
    pool, test_split = _records(train, 'train/'), _records(test, 'test/')
  else:
    scanned = scan_class_folders(root)
    if len(scanned.classes) < 2:
      raise _too_few(root, scanned.classes)
    if not test_fraction or test_fraction <= 0:
      raise DataError(f'The image folder {root} holds its classes directly (DIR/<class>/<image>), so the test '
                      'split is drawn from them, but config.dataset.test_fraction is 0: set it, e.g. '
                      '--config.dataset.test_fraction=0.2, or give DIR/train/<class> and DIR/test/<class>.')
    scans = [scanned]
    everything = _records(scanned, '')
    keep, take = stratified_split(everything.labels, test_fraction, split_seed + 1000)
    pool, test_split = everything.take(keep), everything.take(take)
  size = _check_one_size(scans) if preprocess == 'cifar' else None
  log.info('Image folder %s: %d classes, %d training-pool and %d test images', root, len(scans[0].classes),
           len(pool), len(test_split))
  return pool, test_split, list(scans[0].classes), size
