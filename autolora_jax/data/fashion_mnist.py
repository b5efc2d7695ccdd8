"""Fashion-MNIST (`config.dataset.name='fashion_mnist'`): 70,000 grey 28x28 images of 10 kinds of clothing.

Read, in this order, from

1. TFDS (builder 'fashion_mnist', splits train / test), if prepared in config.dataset.data_dir (empty:
   TFDS's default folder);
2. the four original idx files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
   ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, gzipped or not) in data_dir,
   data_dir/fashion_mnist or `SYSTEM_DIR`, where the Debian/Ubuntu package ``dataset-fashion-mnist``
   installs them;
3. with config.dataset.download=True, TFDS downloads and prepares it in data_dir.

`load` returns grey uint8 (N, 28, 28) images and int32 labels of the train (60,000) and test (10,000) splits;
data/memory.py serves them in memory, replicated to RGB.
"""

from __future__ import annotations

import gzip
import logging
import os
from typing import List, Optional, Tuple

import numpy as np

from autolora_jax.data import sources
from autolora_jax.errors import DataError

log = logging.getLogger(__name__)

NAME = 'fashion_mnist'
NUM_CLASSES = 10
SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
APT_PACKAGE = 'dataset-fashion-mnist'
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
# idx type codes (the third byte of the magic number) and their big-endian numpy types.
IDX_TYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _damaged(path: str, problem: str) -> DataError:
  return DataError(f'The Fashion-MNIST file {path} is damaged: {problem}. Replace it with the original file '
                   f'(`apt-get install --reinstall {APT_PACKAGE}`, or download the four idx files again).')


def read_idx(path: str) -> np.ndarray:
  """An idx file (gzipped if the name ends in .gz): magic 0x0000TTDD, DD big-endian uint32 sizes, data."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        raw = f.read()
    else:
      with open(path, 'rb') as f:
        raw = f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise _damaged(path, f'it cannot be read ({type(e).__name__}: {e})') from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
    raise _damaged(path, f'it does not start with an idx magic number (got {raw[:4].hex() or "an empty file"})')
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise _damaged(path, f'its header is cut short ({len(raw)} bytes for {ndim} dimensions)')
  dims = tuple(int(d) for d in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  dtype = np.dtype(IDX_TYPES[raw[2]])
  expected = header + int(np.prod(dims)) * dtype.itemsize
  if len(raw) != expected:
    raise _damaged(path, f'its header says {"x".join(map(str, dims))} values ({expected} bytes) but it holds '
                   f'{len(raw)} bytes')
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder('='))


def _file(folder: str, stem: str) -> Optional[str]:
  for name in (stem + '.gz', stem):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def idx_folders(data_dir: str) -> List[str]:
  """The folders searched for the idx files, in order."""
  out = []
  if data_dir:
    base = os.path.expanduser(data_dir)
    out += [base, os.path.join(base, NAME)]
  return out + [SYSTEM_DIR]


def find_idx(data_dir: str) -> Optional[dict]:
  """{stem: path} of the four idx files in the first folder that holds any of them; None if none does."""
  stems = [s for pair in FILES.values() for s in pair]
  for folder in idx_folders(data_dir):
    found = {s: _file(folder, s) for s in stems}
    if all(found.values()):
      return found
    if any(found.values()):
      missing = [s for s, p in found.items() if p is None]
      raise DataError(f'The Fashion-MNIST folder {folder} lacks {", ".join(m + "(.gz)" for m in missing)}: it '
                      f'needs all four idx files ({", ".join(stems)}, gzipped or not). Copy the missing ones '
                      'there.')
  return None


def read_idx_files(paths: dict) -> Arrays:
  """(train images, train labels, test images, test labels) from the four idx files, checked."""
  out = []
  for images_stem, labels_stem in FILES.values():
    images, labels = read_idx(paths[images_stem]), read_idx(paths[labels_stem])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
      raise _damaged(paths[images_stem], f'it holds {images.dtype} {images.shape}, not uint8 (N, 28, 28) images')
    if labels.ndim != 1 or labels.dtype != np.uint8 or (len(labels) and labels.max() >= NUM_CLASSES):
      raise _damaged(paths[labels_stem], f'it holds {labels.dtype} {labels.shape} values, not uint8 labels 0-9')
    if len(labels) != len(images):
      raise _damaged(paths[labels_stem], f'it has {len(labels)} labels for the {len(images)} images of '
                     f'{paths[images_stem]}')
    out += [images, labels.astype(np.int32)]
  return tuple(out)


def _from_tfds(data_dir: str, download: bool) -> Optional[Arrays]:
  try:
    import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  spec = sources.Spec('tfds', NUM_CLASSES, style='cifar')  # decoded uint8 arrays
  got = (sources.load_tfds(NAME, spec, data_dir, download=True) if download
         else sources.read_tfds_if_prepared(NAME, spec, data_dir))
  if got is None:
    return None
  pool, test, _ = got
  return (pool.records[..., 0], pool.labels, test.records[..., 0], test.labels)


def not_found(data_dir: str) -> DataError:
  tfds_dir = os.path.expanduser(data_dir) if data_dir else sources.default_data_dir()
  return DataError(
      f'The data set fashion_mnist was not found: not prepared for TFDS in {tfds_dir}, and no idx files '
      f'(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
      f't10k-labels-idx1-ubyte.gz) in {", ".join(idx_folders(data_dir))}. Get it either way: '
      f'`sudo apt-get install {APT_PACKAGE}` (installs the idx files in {SYSTEM_DIR}, found without '
      f'further flags), or for TFDS `{sources.prepare_command(NAME, tfds_dir)}` (or pass '
      '--config.dataset.download=True to let the run download it) and --config.dataset.data_dir='
      f'{tfds_dir}. See docs/checkpoints_and_data.md, "3. Preparing the data sets".')


def load(data_dir: str = '', download: bool = False) -> Arrays:
  """(train images, train labels, test images, test labels): uint8 (N, 28, 28) and int32 (N,)."""
  got = _from_tfds(data_dir, download=False)
  if got is not None:
    log.info('fashion_mnist: from TFDS')
    return got
  paths = find_idx(data_dir)
  if paths is not None:
    log.info('fashion_mnist: from the idx files in %s', os.path.dirname(paths[FILES['train'][0]]))
    return read_idx_files(paths)
  if download:
    got = _from_tfds(data_dir, download=True)
    if got is not None:
      return got
  raise not_found(data_dir)
