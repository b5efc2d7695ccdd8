"""Data sets that need no download: mnist5k, fashion_mnist (idx files the test writes, and TFDS's mock data)
and folder (generated image folders in both layouts); train_per_class_limit; the clear errors for missing or
malformed data, class indices a data set does not have and a config file that does not exist."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from autolora_jax import config_checks
from autolora_jax.configs import default, demo
from autolora_jax.data import (
  check_class_selection,
  core,
  create_dataset,
  fashion_mnist,
  memory,
  num_classes_of,
  sources,
)
from autolora_jax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(name, **overrides):
  config = default.get_config()
  config.dataset.name = name
  for k, v in overrides.items():
    setattr(config.dataset, k, v)
  return config.dataset


def create(name, seed=0, **overrides):
  return create_dataset(data_config(name, **overrides), seed=seed)


def eval_all(data, split, global_batch):
  """Images, labels of a split through eval_batches, padding dropped; checks the mask."""
  images, labels, masks = [], [], []
  for b in data.eval_batches(split, global_batch):
    # ImageDatasets ship uint8 (scaled on the device), the in-memory data sets float32 in [0, 1].
    assert b['image'].shape[0] == global_batch and b['image'].dtype in (np.uint8, np.float32)
    images.append(b['image'])
    labels.append(b['label'])
    masks.append(b['mask'])
  n = data.num_examples(split)
  mask = np.concatenate(masks) if masks else np.zeros(0)
  assert mask.sum() == n and np.all(mask[:n] == 1) and np.all(mask[n:] == 0)
  if not n:
    return np.zeros((0,)), np.zeros((0,), np.int32)
  return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def image_ids(images):
  """Each image as bytes of its uint8 pixels (to identify examples across splits)."""
  return [np.rint(im * 255).astype(np.uint8).tobytes() for im in images]


# -- mnist5k ---------------------------------------------------------------------------------------------

def test_mnist5k_splits_batches_and_determinism():
  images, labels = memory.load_mnist5k()
  assert images.shape == (5000, 28, 28, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [500] * 10)  # before splitting
  ids = {im.tobytes(): i for i, im in enumerate(images)}
  assert len(ids) == 5000  # distinct images: an image identifies its index

  data = create('mnist5k', seed=2, test_fraction=0.2, val_fraction=0.1)
  assert data.num_classes == 10
  assert data.num_examples('test') == 1000 and data.num_examples('validation') == 400
  assert data.num_examples('train') == 3600
  index = {}
  for split in ('train', 'validation', 'test'):
    x, y = eval_all(data, split, 128)  # every example exactly once
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.shape[1:] == (28, 28, 3)
    index[split] = [ids[b] for b in image_ids(x)]
    assert len(set(index[split])) == data.num_examples(split)
    np.testing.assert_array_equal(labels[index[split]], y)
  assert not set(index['train']) & set(index['validation'])
  assert not (set(index['train']) | set(index['validation'])) & set(index['test'])
  assert len(set().union(*index.values())) == 5000

  batches = list(data.train_batches(0, 64))
  assert len(batches) == 3600 // 64
  b = batches[0]
  assert b['image'].shape == (64, 28, 28, 3) and b['image'].dtype == np.float32
  assert 0.0 <= b['image'].min() and b['image'].max() <= 1.0 and b['label'].dtype == np.int32
  again = create('mnist5k', seed=2, test_fraction=0.2, val_fraction=0.1)
  for x, y in zip(batches[:3], again.train_batches(0, 64)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  other = next(create('mnist5k', seed=3, test_fraction=0.2, val_fraction=0.1).train_batches(0, 64))
  assert not np.array_equal(other['label'], b['label']) or not np.array_equal(other['image'], b['image'])


def test_in_memory_train_per_class_limit():
  data = create('mnist5k', test_fraction=0.2, val_fraction=0.1, train_per_class_limit=50)
  pool = np.concatenate([data.splits['train'][1], data.splits['validation'][1]])
  np.testing.assert_array_equal(np.bincount(pool), [50] * 10)  # taken before the validation split
  assert data.num_examples('validation') == 50 and data.num_examples('test') == 1000  # test untouched
  again = create('mnist5k', test_fraction=0.2, val_fraction=0.1, train_per_class_limit=50)
  np.testing.assert_array_equal(again.splits['train'][0], data.splits['train'][0])
  other = create('mnist5k', test_fraction=0.2, val_fraction=0.1, train_per_class_limit=50, split_seed=1)
  assert not np.array_equal(other.splits['train'][0], data.splits['train'][0])
  # A limit above every class's count keeps the whole pool; classes select and relabel first.
  assert create('digits', test_fraction=0.25, train_per_class_limit=10 ** 6).num_examples('train') == \
      create('digits', test_fraction=0.25).num_examples('train')
  sub = create('digits', test_fraction=0.25, val_fraction=0.0, classes=(7, 2), train_per_class_limit=20)
  np.testing.assert_array_equal(np.bincount(sub.splits['train'][1]), [20, 20])


def test_per_class_limit_rule():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
  keep = core.per_class_limit(labels, 4, seed=0)
  assert np.all(np.diff(keep) > 0)  # sorted: the pool's order is kept
  np.testing.assert_array_equal(np.bincount(labels[keep]), [4, 3, 4])
  np.testing.assert_array_equal(keep, core.per_class_limit(labels, 4, seed=0))
  np.testing.assert_array_equal(core.per_class_limit(labels, 0, seed=0), np.arange(len(labels)))


def test_array_dataset_augments_each_example_from_seed_epoch_and_position():
  """The one augmentation contract (core): (image, rng) -> image per example, rng = example_rng(seed, epoch,
  position in the epoch's order), so a process's rows and a resumed epoch see the same augmentation."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 2, 2, 3)).astype(np.uint8)
  labels = np.arange(30) % 3
  noise = lambda x, r: np.clip(x.astype(np.int32) + r.integers(0, 9, x.shape), 0, 255).astype(np.uint8)
  one = memory.ArrayDataset({'train': (images, labels)}, 3, seed=4, train_transform=noise)
  order = one.train_order(1)
  expected = np.stack([noise(images[i], core.example_rng(4, 1, p)) for p, i in enumerate(order[:24])])
  got = np.concatenate([b['image'] for b in one.train_batches(1, 8)])
  np.testing.assert_array_equal(got, expected.astype(np.float32) / 255.0)
  halves = [memory.ArrayDataset({'train': (images, labels)}, 3, seed=4, train_transform=noise, process_index=k,
                                process_count=2) for k in (0, 1)]
  resumed = [np.stack([b['image'] for b in h.train_batches(1, 8, start_step=1)]) for h in halves]  # (2, 4, ...)
  np.testing.assert_array_equal(np.concatenate(resumed, axis=1).reshape(got[8:].shape), got[8:])
  plain = memory.ArrayDataset({'train': (images, labels)}, 3, seed=4)
  np.testing.assert_array_equal(next(plain.train_batches(1, 8))['image'],
                                images[order[:8]].astype(np.float32) / 255.0)


# -- fashion_mnist ---------------------------------------------------------------------------------------

def idx_bytes(array):
  array = np.asarray(array, np.uint8)
  return struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape) + \
      array.tobytes()


def write_idx_folder(folder, n_train=60, n_test=20, gz_train=True, gz_test=False):
  """The four idx files; image i of a split is filled with its index, its label is i % 10."""
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, n, gz in (('train', n_train, gz_train), ('t10k', n_test, gz_test)):
    images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None], (n, 28, 28)).copy()
    images[:, 0, 0] = 200 + (np.arange(n) // 256)  # distinct even past 256 images
    labels = (np.arange(n) % 10).astype(np.uint8)
    arrays[split] = (images, labels)
    for kind, array in (('images-idx3', images), ('labels-idx1', labels)):
      path = os.path.join(folder, f'{split}-{kind}-ubyte' + ('.gz' if gz else ''))
      with (gzip.open(path, 'wb') if gz else open(path, 'wb')) as f:
        f.write(idx_bytes(array))
  return arrays


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
  """The system folder (dataset-fashion-mnist) hidden, so only what a test writes is found."""
  monkeypatch.setattr(fashion_mnist, 'SYSTEM_DIR', str(tmp_path / 'no-system-folder'))


def test_fashion_mnist_from_idx_files(tmp_path, no_system_fashion):
  arrays = write_idx_folder(str(tmp_path / 'fm'))
  data = create('fashion_mnist', data_dir=str(tmp_path / 'fm'), val_fraction=0.1)
  assert data.num_classes == 10
  assert (data.num_examples('train'), data.num_examples('validation'), data.num_examples('test')) == (54, 6, 20)
  for split in data.splits:
    x, y = data.splits[split]
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28, 3) and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey replicated to RGB
  # The test split keeps the file's order; every evaluation example comes once.
  x, y = eval_all(data, 'test', 8)
  np.testing.assert_array_equal(np.rint(x[:, 5, 5, 0] * 255), arrays['t10k'][0][:, 5, 5])
  np.testing.assert_array_equal(y, arrays['t10k'][1])
  train_ids = {int(v) for v in data.splits['train'][0][:, 5, 5, 0]}
  val_ids = {int(v) for v in data.splits['validation'][0][:, 5, 5, 0]}
  assert not train_ids & val_ids and len(train_ids | val_ids) == 60
  b = next(data.train_batches(0, 16))
  assert b['image'].shape == (16, 28, 28, 3) and 0 <= b['image'].min() and b['image'].max() <= 1

  # data_dir/fashion_mnist is looked in too; classes select and relabel in order; the per-class limit.
  write_idx_folder(str(tmp_path / 'tfds' / 'fashion_mnist'), gz_train=False, gz_test=True)
  sub = create('fashion_mnist', data_dir=str(tmp_path / 'tfds'), classes=(3, 1), val_fraction=0.0,
               train_per_class_limit=4)
  assert sub.num_classes == 2 and sub.num_examples('train') == 8 and sub.num_examples('test') == 4
  np.testing.assert_array_equal(sub.splits['test'][1], [1, 0, 1, 0])  # test ids 1, 3, 11, 13 in order
  np.testing.assert_array_equal(sub.splits['test'][0][:, 5, 5, 0], [1, 3, 11, 13])
  assert set(sub.splits['train'][0][:, 5, 5, 0] % 10) == {1, 3}


def test_fashion_mnist_damaged_or_missing_files(tmp_path, no_system_fashion):
  folder = str(tmp_path / 'fm')
  write_idx_folder(folder)
  bad = os.path.join(folder, 't10k-labels-idx1-ubyte')
  with open(bad, 'wb') as f:
    f.write(b'\x00\x00\x07\x01not an idx file')
  with pytest.raises(DataError, match='The Fashion-MNIST file ' + bad + ' is damaged.*magic'):
    create('fashion_mnist', data_dir=folder)
  with open(bad, 'wb') as f:
    f.write(idx_bytes(np.zeros(20, np.uint8))[:-3])  # cut short
  with pytest.raises(DataError, match=bad + ' is damaged: its header says 20 values'):
    create('fashion_mnist', data_dir=folder)
  with open(bad, 'wb') as f:
    f.write(idx_bytes(np.zeros(19, np.uint8)))  # one label short
  with pytest.raises(DataError, match=bad + ' is damaged: it has 19 labels for the 20 images'):
    create('fashion_mnist', data_dir=folder)
  gz = os.path.join(folder, 'train-images-idx3-ubyte.gz')
  with open(gz, 'wb') as f:
    f.write(b'no gzip here')
  with pytest.raises(DataError, match=gz + ' is damaged: it cannot be read'):
    create('fashion_mnist', data_dir=folder)
  os.remove(gz)
  with pytest.raises(DataError, match=f'The Fashion-MNIST folder {folder} lacks train-images-idx3-ubyte'):
    create('fashion_mnist', data_dir=folder)

  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  with pytest.raises(DataError) as e:
    create('fashion_mnist', data_dir=empty)
  msg = str(e.value)
  assert msg.startswith('The data set fashion_mnist was not found') and '\n' not in msg
  for text in (empty, os.path.join(empty, 'fashion_mnist'), fashion_mnist.SYSTEM_DIR,
               'apt-get install dataset-fashion-mnist', sources.prepare_command('fashion_mnist', empty),
               '--config.dataset.download=True'):
    assert text in msg


def test_fashion_mnist_through_tfds_mock_data(tmp_path, no_system_fashion):
  tfds = pytest.importorskip('tensorflow_datasets')
  # mock_data serves random examples for any builder, prepared or not (its metadata comes from TFDS's code).
  with tfds.testing.mock_data(num_examples=30):
    data = create('fashion_mnist', data_dir=str(tmp_path / 'tfds'), val_fraction=0.1)
  assert data.num_classes == 10
  assert (data.num_examples('train'), data.num_examples('validation'), data.num_examples('test')) == (27, 3, 30)
  x, y = data.splits['train']
  assert x.shape == (27, 28, 28, 3) and x.dtype == np.uint8 and y.max() < 10
  np.testing.assert_array_equal(x[..., 0], x[..., 1])
  x, _ = eval_all(data, 'test', 16)
  assert x.shape == (30, 28, 28, 3)


def test_fashion_mnist_system_folder_when_installed():
  if not os.path.isfile(os.path.join(fashion_mnist.SYSTEM_DIR, 't10k-labels-idx1-ubyte.gz')):
    pytest.skip('dataset-fashion-mnist is not installed')
  paths = fashion_mnist.find_idx('')
  labels = fashion_mnist.read_idx(paths['t10k-labels-idx1-ubyte'])
  assert labels.shape == (10000,) and labels.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


# -- folder (your own images) ------------------------------------------------------------------------------

COLOURS = iter(range(1, 10 ** 6))


def write_images(folder, count, size=(12, 10), fmt='png', sizes=None):
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    c = next(COLOURS)
    image = Image.new('RGB', sizes[i] if sizes else size, (c % 256, (c // 256) % 256, 100))
    ext = 'jpg' if fmt == 'jpeg' and i % 2 else 'png'  # JPEG is lossy: a colour close to the one written
    image.save(os.path.join(folder, f'img{i:03d}.{ext}'))


def write_split_layout(root, train_counts, test_counts, **kwargs):
  for name, count in train_counts.items():
    write_images(os.path.join(root, 'train', name), count, **kwargs)
  for name, count in test_counts.items():
    write_images(os.path.join(root, 'test', name), count, **kwargs)
  return str(root)


def colour_ids(images):
  return [tuple(int(v) for v in im[2, 2, :2]) for im in images]  # uint8 images


def test_folder_split_layout(tmp_path):
  root = write_split_layout(tmp_path / 'pets', {'cat': 7, 'ant': 6, 'bee': 5}, {'cat': 3, 'ant': 2, 'bee': 2})
  os.makedirs(tmp_path / 'pets' / 'train' / '.cache')  # hidden entries are skipped
  open(tmp_path / 'pets' / 'train' / 'cat' / '.DS_Store', 'w').close()
  kwargs = dict(data_dir=root, preprocess='cifar', val_fraction=0.2)
  data = create('folder', seed=1, **kwargs)
  assert data.num_classes == 3
  # Classes are the sorted folder names: ant 0, bee 1, cat 2.
  pool = np.concatenate([data.splits['train'].labels, data.splits['validation'].labels])
  np.testing.assert_array_equal(np.bincount(pool), [6, 5, 7])
  np.testing.assert_array_equal(np.bincount(data.splits['test'].labels), [2, 2, 3])
  assert data.num_examples('validation') == round(0.2 * 18)
  for split in ('train', 'validation', 'test'):
    for key, label in zip(data.keys(split), data.splits[split].labels):
      assert key.split('/')[1] == ['ant', 'bee', 'cat'][label]
      assert key.startswith('test/' if split == 'test' else 'train/')
  keys = {s: set(data.keys(s)) for s in data.splits}
  assert not keys['train'] & keys['validation'] and not (keys['train'] | keys['validation']) & keys['test']
  # 'cifar' keeps the images' own size (12 wide, 10 high); every eval example once, in order.
  seen = set()
  for split in ('validation', 'test'):
    x, y = eval_all(data, split, 4)
    assert x.shape[1:] == (10, 12, 3)
    np.testing.assert_array_equal(y, data.splits[split].labels)
    ids = colour_ids(x)
    assert len(set(ids)) == len(ids) and not seen & set(ids)
    seen |= set(ids)
  b = next(data.train_batches(0, 4))
  assert b['image'].shape == (4, 10, 12, 3) and b['image'].dtype == np.uint8
  # The same seed gives the same order and augmentation.
  again = create('folder', seed=1, **kwargs)
  np.testing.assert_array_equal(again.train_order(0), data.train_order(0))
  np.testing.assert_array_equal(next(again.train_batches(0, 4))['image'], b['image'])
  assert not np.array_equal(create('folder', seed=2, **kwargs).train_order(0), data.train_order(0))
  # 'imagenet' (the default): resize 256, crop 224.
  big = create('folder', data_dir=root, val_fraction=0.2)
  x, _ = eval_all(big, 'test', 8)
  assert x.shape == (7, 224, 224, 3)
  assert next(big.train_batches(0, 4))['image'].shape == (4, 224, 224, 3)
  for d in (data, again, big):
    d.close()


def test_folder_flat_layout_with_test_fraction(tmp_path):
  root = tmp_path / 'flat'
  for name, count in (('zebra', 8), ('yak', 12), ('ox', 4)):
    write_images(str(root / name), count, fmt='jpeg')
  data = create('folder', data_dir=str(root), test_fraction=0.25, val_fraction=0.1, preprocess='cifar')
  assert data.num_classes == 3  # ox 0, yak 1, zebra 2
  np.testing.assert_array_equal(np.bincount(data.splits['test'].labels), [1, 3, 2])  # a quarter of each
  pool = np.concatenate([data.splits['train'].labels, data.splits['validation'].labels])
  np.testing.assert_array_equal(np.bincount(pool), [3, 9, 6])
  all_keys = [k for s in data.splits for k in data.keys(s)]
  assert len(all_keys) == len(set(all_keys)) == 24
  again = create('folder', data_dir=str(root), test_fraction=0.25, val_fraction=0.1, preprocess='cifar')
  for s in data.splits:
    np.testing.assert_array_equal(again.keys(s), data.keys(s))
  x, y = eval_all(data, 'test', 4)
  assert x.shape == (6, 10, 12, 3)
  np.testing.assert_array_equal(y, data.splits['test'].labels)
  limited = create('folder', data_dir=str(root), test_fraction=0.25, val_fraction=0.0, preprocess='cifar',
                   train_per_class_limit=4)
  np.testing.assert_array_equal(np.bincount(limited.splits['train'].labels), [3, 4, 4])
  assert set(limited.keys('train')) <= set(data.keys('train')) | set(data.keys('validation'))
  np.testing.assert_array_equal(limited.keys('test'), data.keys('test'))
  sub = create('folder', data_dir=str(root), test_fraction=0.25, preprocess='cifar', classes=(2, 0))
  assert sub.num_classes == 2
  assert {k.split('/')[0] for s in sub.splits for k in sub.keys(s)} == {'zebra', 'ox'}
  for d in (data, again, limited, sub):
    d.close()


def test_tfds_train_per_class_limit():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=200):
    data = create('cifar10', train_per_class_limit=3, val_fraction=0.0)
  assert np.bincount(data.splits['train'].labels).max() <= 3
  assert data.num_examples('test') == 200


FOLDER_ERRORS = [
    ('missing', 'The image folder {root} (config.dataset.data_dir) does not exist'),
    ('no_data_dir', 'config.dataset.name=folder reads your own images from config.dataset.data_dir, which is '
                    'empty'),
    ('no_classes', 'The image folder {root} has no class sub-folders'),
    ('one_class', 'The image folder {root} has 1 class folder (only): a classifier needs at least 2.'),
    ('empty_class', "The class 'bee' ({root}/train/bee) has no images"),
    ('text_file', 'The file {root}/train/ant/notes.txt is not an image'),
    ('fake_png', 'The file {root}/test/bee/broken.png is not an image PIL can read'),
    ('differ', 'The class folders of {root}/train and {root}/test differ: only in train: cat, dog; only in '
               'test: cow'),
    ('train_only', 'The image folder {root} has a train/ folder but no test/ folder'),
    ('no_test_fraction', 'config.dataset.test_fraction is 0: set it, e.g. --config.dataset.test_fraction=0.2'),
    ('sizes', 'all images of the folder must have one size, but {root}/train/bee/img001.png is 9x9 while '
              '{root}/train/ant/img000.png is 12x10'),
    ('nested', 'The class folder {root}/ant holds sub-folders (more)'),
]


@pytest.mark.parametrize('case,message', FOLDER_ERRORS, ids=[c for c, _ in FOLDER_ERRORS])
def test_folder_errors(tmp_path, case, message):
  root = tmp_path / 'images'
  overrides = {'data_dir': str(root)}
  if case in ('empty_class', 'text_file', 'fake_png', 'differ', 'sizes'):
    write_split_layout(root, {'ant': 2, 'bee': 2}, {'ant': 1, 'bee': 1})
  if case == 'no_data_dir':
    overrides['data_dir'] = ''
  elif case == 'no_classes':
    os.makedirs(root)
    Image.new('RGB', (4, 4)).save(root / 'loose.png')
  elif case == 'one_class':
    write_images(str(root / 'only'), 3)
    overrides['test_fraction'] = 0.2
  elif case == 'empty_class':
    for f in os.listdir(root / 'train' / 'bee'):
      os.remove(root / 'train' / 'bee' / f)
  elif case == 'text_file':
    (root / 'train' / 'ant' / 'notes.txt').write_text('not an image')
  elif case == 'fake_png':
    (root / 'test' / 'bee' / 'broken.png').write_bytes(b'\x00' * 64)
  elif case == 'differ':
    write_images(str(root / 'train' / 'cat'), 1)
    write_images(str(root / 'train' / 'dog'), 1)
    write_images(str(root / 'test' / 'cow'), 1)
  elif case == 'train_only':
    write_images(str(root / 'train' / 'ant'), 2)
  elif case == 'no_test_fraction':
    write_images(str(root / 'ant'), 2)
    write_images(str(root / 'bee'), 2)
  elif case == 'sizes':
    Image.new('RGB', (9, 9)).save(root / 'train' / 'bee' / 'img001.png')
    overrides['preprocess'] = 'cifar'
  elif case == 'nested':
    write_images(str(root / 'ant' / 'more'), 1)
    write_images(str(root / 'bee'), 1)
    overrides['test_fraction'] = 0.5
  with pytest.raises(DataError) as e:
    create('folder', **overrides)
  assert message.format(root=root) in str(e.value), str(e.value)
  assert '\n' not in str(e.value)


def test_folder_header_check_is_fast(tmp_path):
  root = tmp_path / 'many'
  for name in ('a', 'b'):
    os.makedirs(root / name)
    for i in range(500):
      Image.new('RGB', (8, 8), (i % 256, 0, 0)).save(root / name / f'{i}.png')
  import time  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  pool, test, classes, _ = sources.folder.load(str(root), 'imagenet', 0.2, 0)
  seconds = time.perf_counter() - start
  assert classes == ['a', 'b'] and len(pool) + len(test) == 1000
  assert seconds < 2.0, seconds  # a header read per file, no decoding


# -- class indices -----------------------------------------------------------------------------------------

def test_class_indices_the_data_set_does_not_have(tmp_path):
  # The demo's `--config.dataset.classes=(5,6,42)`: refused by the config check, before any workdir or model.
  config = demo.get_config()
  config.dataset.classes = (5, 6, 42)
  with pytest.raises(ConfigError, match=r'config.dataset.classes=\(5, 6, 42\): the data set mnist5k has 10 '
                                        r'classes \(indices 0-9\), so the class index 42 does not exist'):
    config_checks.validate(config)
  config = demo.get_config()
  config.pretrain.dataset.classes = (0, 10, 11)
  with pytest.raises(ConfigError, match=r'config.pretrain.dataset.classes=.*class indices 10, 11 do not'):
    config_checks.validate(config)
  config = demo.get_config()
  config.dataset.classes = (5, 6, 5)
  with pytest.raises(ConfigError, match='names the class 5 more than once'):
    config_checks.validate(config)
  config.dataset.classes = (-1, 2)
  with pytest.raises(ConfigError, match='the class index -1 does not exist'):
    config_checks.validate(config)
  # create_dataset refuses them too, for every kind of data set, before reading the data.
  for name, count in (('mnist5k', 10), ('digits', 10), ('fashion_mnist', 10), ('cifar100', 100),
                      ('stanford_dogs', 120)):
    with pytest.raises(ConfigError, match=f'the data set {name} has {count} classes'):
      create(name, classes=(0, count), data_dir=str(tmp_path / 'nothing'))
  write_split_layout(tmp_path / 'three', {'a': 1, 'b': 1, 'c': 1}, {'a': 1, 'b': 1, 'c': 1})
  with pytest.raises(ConfigError, match=r'the data set folder has 3 classes \(indices 0-2\), so the class '
                                        r'index 3 does not exist'):
    create('folder', data_dir=str(tmp_path / 'three'), classes=(0, 3))
  for c in range(3):
    write_images(str(tmp_path / 'caltech' / f'{c + 1:03d}.c{c}'), 2)
  with pytest.raises(ConfigError, match='the data set caltech256 has 3 classes'):
    create('caltech256', data_dir=str(tmp_path / 'caltech'), classes=(1, 7))
  # A folder's class count is read from its class folders (for config.pretrain.dataset, before the model).
  assert num_classes_of(data_config('folder', data_dir=str(tmp_path / 'three'))) == 3
  with pytest.raises(ConfigError, match='config.pretrain.dataset.classes=.*index 5 does not exist'):
    check_class_selection(data_config('folder', data_dir=str(tmp_path / 'three'), classes=(5,)),
                                         key='config.pretrain.dataset')


def test_pretrain_folder_classes_refused_before_the_model(tmp_path, monkeypatch):
  from autolora_jax import experiment, train  # pylint: disable=g-import-not-at-top
  write_split_layout(tmp_path / 'three', {'a': 1, 'b': 1, 'c': 1}, {'a': 1, 'b': 1, 'c': 1})

  def no_model(*args, **kwargs):
    raise AssertionError('a model was built')

  monkeypatch.setattr(experiment, 'create_model', no_model)
  monkeypatch.setattr(experiment, 'build_model', no_model)
  config = demo.get_config()
  config.pretrain.dataset.name = 'folder'
  config.pretrain.dataset.data_dir = str(tmp_path / 'three')
  config.pretrain.dataset.classes = (0, 4)
  config.progress = config.tensorboard = False
  workdir = str(tmp_path / 'work')
  with pytest.raises(ConfigError, match='the data set folder has 3 classes'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


# -- a config file that does not exist ---------------------------------------------------------------------

def test_missing_config_file_is_one_paragraph(tmp_path):
  done = subprocess.run([sys.executable, 'run.py', '--config=configs/nope.py', f'--workdir={tmp_path / "x"}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'PYTHONPATH': ROOT})
  assert done.returncode == 2, done.stderr
  assert 'Traceback' not in done.stderr
  err = done.stderr.strip()
  assert err.startswith('error: the config file configs/nope.py') and 'does not exist' in err
  assert 'no packaged config is named nope' in err and 'demo, dogs' in err and 'cifar10' in err
  assert '--config=NAME' in err and len(err.splitlines()) == 1
  assert not os.path.exists(tmp_path / 'x')


def test_config_file_check_for_other_entry_points():
  from autolora_jax import cli  # pylint: disable=g-import-not-at-top
  cli.check_config_file(['prog', '--config=configs/demo.py'])
  cli.check_config_file(['prog', '--config', os.path.join(ROOT, 'configs', 'demo.py')])
  cli.check_config_file(['prog', '--config=demo'])  # a packaged config by name
  cli.check_config_file(['prog'])  # absent: the flag parser reports it
  with pytest.raises(ConfigError, match='the config file configs/none.py .* does not exist'):
    cli.check_config_file(['prog', '--workdir=/tmp', '--config', 'configs/none.py'])
  assert cli.config_flag_value(['--a=1', '--cfg=x.py'], flag='cfg') == 'x.py'
