"""The paper's data sets through tfds.testing.mock_data and generated Caltech-256 folders: shapes, ranges,
splits, determinism, per-process shards, evaluation coverage, preprocessing, the reference-compat splits and
the clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip('tensorflow_datasets')

from autolora_jax.configs import caltech256, cifar10, cifar100, cub200, dogs, dtd  # noqa: E402
from autolora_jax.data import create_dataset, sources, transforms  # noqa: E402
from autolora_jax.errors import DataError  # noqa: E402

TFDS_CONFIGS = {'cifar10': (cifar10, 10), 'cifar100': (cifar100, 100), 'dtd': (dtd, 47),
                'stanford_dogs': (dogs, 120), 'caltech_birds2011': (cub200, 200)}
MOCK_EXAMPLES = 40


def make(config_module, *, seed=0, process_index=0, process_count=1, reference_compat=False, threads=None,
         **dataset_overrides):
  config = config_module.get_config()
  for k, v in dataset_overrides.items():
    setattr(config.dataset, k, v)
  if threads is None:
    return create_dataset(config.dataset, seed=seed, process_index=process_index,
                          process_count=process_count, reference_compat=reference_compat)
  return sources.create(config.dataset, seed=seed, process_index=process_index, process_count=process_count,
                        reference_compat=reference_compat, threads=threads)


def collect_eval(datasets, split, global_batch):
  """Images, labels and masks of a split, the rows of all processes put back together."""
  parts = [list(d.eval_batches(split, global_batch)) for d in datasets]
  images, labels, masks = [], [], []
  for batches in zip(*parts):
    images.append(np.concatenate([b['image'] for b in batches]))
    labels.append(np.concatenate([b['label'] for b in batches]))
    masks.append(np.concatenate([b['mask'] for b in batches]))
  return np.concatenate(images), np.concatenate(labels), np.concatenate(masks)


def check_splits(data, num_classes, pool_keys_prefixes):
  """Train / validation / test disjoint; train + validation = the training pool; labels in range."""
  keys = {s: list(data.keys(s)) for s in ('train', 'validation', 'test')}
  assert len(set(keys['train'])) == len(keys['train'])
  assert not set(keys['train']) & set(keys['validation'])
  assert not (set(keys['train']) | set(keys['validation'])) & set(keys['test'])
  assert all(k.split('/')[0] in pool_keys_prefixes for k in keys['train'] + keys['validation'])
  for s in keys:
    labels = data.splits[s].labels
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < num_classes


@pytest.mark.slow
@pytest.mark.parametrize('name', list(TFDS_CONFIGS))
def test_tfds_data_sets_through_mock_data(name):
  module, num_classes = TFDS_CONFIGS[name]
  cifar = name.startswith('cifar')
  size = 32 if cifar else 224
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    data = make(module, seed=3)
    same = make(module, seed=3, threads=0)
    other = make(module, seed=4)
    halves = [make(module, seed=3, process_index=i, process_count=2) for i in range(2)]
  pool = MOCK_EXAMPLES * (2 if name == 'dtd' else 1)  # DTD trains on its train + validation splits
  assert data.num_classes == num_classes
  assert data.num_examples('validation') == round(0.05 * pool)
  assert data.num_examples('train') + data.num_examples('validation') == pool
  assert data.num_examples('test') == MOCK_EXAMPLES
  check_splits(data, num_classes, ('train', 'validation') if name == 'dtd' else ('train',))
  if not cifar:  # kept encoded: decoded only batch by batch
    assert data.splits['train'].records.dtype == object

  batches = list(data.train_batches(1, 8))
  assert len(batches) == data.steps_per_epoch(8) == data.num_examples('train') // 8  # drop remainder
  b = batches[0]
  assert b['image'].shape == (8, size, size, 3) and b['image'].dtype == np.uint8  # scaled on the device
  assert b['image'].std() > 0.05 * 255
  assert b['label'].dtype == np.int32 and b['label'].max() < num_classes
  np.testing.assert_array_equal(b['index'], np.arange(8))

  # The same seed gives the same order and augmentation (with or without threads), another seed does not.
  again = list(same.train_batches(1, 8))
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(data.train_order(1), other.train_order(1))
  assert not np.array_equal(data.train_order(1), data.train_order(2))
  # A resumed epoch (start_step) reproduces the rest; two processes each feed their half of each batch.
  resumed = list(data.train_batches(1, 8, start_step=1))
  np.testing.assert_array_equal(resumed[0]['image'], batches[1]['image'])
  for step, (p0, p1) in enumerate(zip(halves[0].train_batches(1, 8), halves[1].train_batches(1, 8))):
    np.testing.assert_array_equal(np.concatenate([p0['image'], p1['image']]), batches[step]['image'])
    np.testing.assert_array_equal(np.concatenate([p0['index'], p1['index']]), np.arange(8))

  # Evaluation covers every example exactly once, in order, padded and masked, over one or two processes.
  for split in ('validation', 'test'):
    images, labels, mask = collect_eval([data], split, 16)
    n = data.num_examples(split)
    assert mask.sum() == n and np.all(mask[:n] == 1) and np.all(mask[n:] == 0)
    np.testing.assert_array_equal(labels[:n], data.splits[split].labels)
    assert images.shape[1:] == (size, size, 3) and not np.any(images[n:])
    images2, labels2, mask2 = collect_eval(halves, split, 16)
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(mask2, mask)
  for d in [data, same, other] + halves:
    d.close()


# -- Caltech-256 (image folder) ---------------------------------------------------------------------------

def write_folder(root, counts, size=6):
  """root/<NNN.name>/<NNN_MMMM.jpg-like png>: each image a distinct flat colour (its global index)."""
  index = 0
  for c, count in enumerate(counts):
    folder = os.path.join(root, f'{c + 1:03d}.class{c + 1}')
    os.makedirs(folder)
    for i in range(count):
      colour = (index % 256, (index // 256) % 256, 7 * c % 256)
      Image.new('RGB', (size + i % 3, size), colour).save(os.path.join(folder, f'{c + 1:03d}_{i + 1:04d}.png'))
      index += 1
  open(os.path.join(root, 'README.txt'), 'w').close()  # stray files are ignored
  return root


@pytest.fixture(scope='module')
def caltech_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp('caltech')
  write_folder(str(base / '256_ObjectCategories'), [3 + (c % 2) for c in range(257)])
  return str(base)


def colours(images):
  return [tuple(int(v) for v in im[100, 100, :2]) for im in images]


def test_caltech256_folder(caltech_dir):
  kwargs = dict(data_dir=caltech_dir, train_per_class=2, val_fraction=0.05)
  data = make(caltech256, seed=1, **kwargs)
  halves = [make(caltech256, seed=1, process_index=i, process_count=2, **kwargs) for i in range(2)]
  n_images = sum(3 + (c % 2) for c in range(257))
  assert data.num_classes == 257
  assert data.num_examples('train') + data.num_examples('validation') == 257 * 2
  assert data.num_examples('validation') == round(0.05 * 514)
  assert data.num_examples('test') == n_images - 514
  check_splits(data, 257, tuple(sorted(os.listdir(os.path.join(caltech_dir, '256_ObjectCategories')))))
  # The first two files of each class train; labels follow the sorted class folders.
  train_keys = set(data.keys('train')) | set(data.keys('validation'))
  assert '001.class1/001_0001.png' in train_keys and '001.class1/001_0003.png' in set(data.keys('test'))
  # Splits are disjoint in content too (each image has its own colour), and eval covers each once.
  seen = {}
  for split in ('train', 'validation', 'test'):
    images, labels, mask = collect_eval(halves, split, 32)
    n = data.num_examples(split)
    assert mask.sum() == n
    np.testing.assert_array_equal(labels[:n], data.splits[split].labels)
    seen[split] = set(colours(images[:n]))
    assert len(seen[split]) == n
  assert not (seen['train'] & seen['validation'] or seen['train'] & seen['test']
              or seen['validation'] & seen['test'])
  b = next(data.train_batches(2, 16))
  assert b['image'].shape == (16, 224, 224, 3) and b['image'].dtype == np.uint8
  assert b['label'].max() < 257
  for d in [data] + halves:
    d.close()


# -- docs/method.md "Where the public code differs", items 4 and 7 (reference_compat) -----------------------------

def test_reference_compat_dtd_validation_is_test_and_head_57():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    paper = make(dtd)
    compat = make(dtd, reference_compat=True)
  # Item 4: the paper holds out 5% of the training pool; the public code validates on the test split.
  assert not set(paper.keys('validation')) & set(paper.keys('test'))
  np.testing.assert_array_equal(compat.keys('validation'), compat.keys('test'))
  assert compat.num_examples('train') == 2 * MOCK_EXAMPLES > paper.num_examples('train')
  # Item 7: a 57-way head for 47 classes.
  assert paper.num_classes == 47 and compat.num_classes == 57
  assert compat.splits['train'].labels.max() < 47
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):  # other data sets are unaffected
    assert make(dogs, reference_compat=True).num_examples('validation') == round(0.05 * MOCK_EXAMPLES)


def test_reference_compat_caltech256_running_index(tmp_path):
  root = write_folder(str(tmp_path / 'c256'), [160, 100, 170], size=4)
  paper = make(caltech256, data_dir=root, train_per_class=60)
  compat = make(caltech256, data_dir=root, train_per_class=60, reference_compat=True)
  # Item 7: 150 positions from each class's first image; class 2 (100 images) runs 50 into class 3, whose
  # first 50 images then train twice; the paper's rule takes 60 per class, once each.
  keys = list(compat.keys('train'))
  assert len(keys) == 3 * 150
  dup = {k for k in keys if keys.count(k) == 2}
  assert dup == {f'003.class3/003_{i:04d}.png' for i in range(1, 51)}
  assert keys.count('001.class1/001_0151.png') == 0  # class 1 has 160: its last 10 test
  assert compat.num_examples('test') == 10 + 20
  paper_pool = list(paper.keys('train')) + list(paper.keys('validation'))
  assert len(paper_pool) == len(set(paper_pool)) == 3 * 60 and paper.num_examples('test') == 430 - 180
  # Item 4: validation = test for Caltech-256 too.
  np.testing.assert_array_equal(compat.keys('validation'), compat.keys('test'))
  labels = dict(zip(keys, compat.splits['train'].labels))  # duplicates keep their own class's label
  assert labels['003.class3/003_0001.png'] == 2


def test_running_split_matches_rule():
  train, test = sources.reference_running_split([2, 1, 3], per_class=2)
  np.testing.assert_array_equal(train, [0, 1, 2, 3, 3, 4])
  np.testing.assert_array_equal(test, [5])
  train, test = sources.per_class_split([2, 1, 3], per_class=2)
  np.testing.assert_array_equal(train, [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(test, [5])


# -- preprocessing ---------------------------------------------------------------------------------------

def test_resize_and_center_crop_follow_torchvision_rules():
  image = Image.new('RGB', (500, 375))
  assert transforms.resize_shorter(image).size == (341, 256)
  assert transforms.resize_shorter(Image.new('RGB', (300, 600))).size == (256, 512)
  arr = np.random.RandomState(0).randint(0, 256, (256, 341, 3)).astype(np.uint8)
  out = np.asarray(transforms.center_crop(Image.fromarray(arr)))
  np.testing.assert_array_equal(out, arr[16:240, 58:282])  # top round(32/2)=16, left round(117/2)=58
  assert transforms.imagenet_eval(_png(arr)).shape == (224, 224, 3)


def _png(arr):
  import io
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()


def test_random_resized_crop_box_ranges_and_determinism():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(500):
    top, left, h, w = transforms.random_resized_crop_box(341, 256, rng)
    assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 341
    areas.append(h * w / (341 * 256))
    ratios.append(w / h)
  assert 0.07 <= min(areas) and max(areas) <= 1.0 and max(areas) - min(areas) > 0.7
  assert min(ratios) >= 0.74 and max(ratios) <= 1.35
  a = transforms.imagenet_train(_png(np.zeros((40, 60, 3), np.uint8) + 9), np.random.default_rng([1, 2, 3]))
  b = transforms.imagenet_train(_png(np.zeros((40, 60, 3), np.uint8) + 9), np.random.default_rng([1, 2, 3]))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (224, 224, 3) and a.dtype == np.uint8


def _encoded(arr, fmt, mode='RGB'):
  import io
  buf = io.BytesIO()
  Image.fromarray(arr).convert(mode).save(buf, format=fmt, quality=90)
  return buf.getvalue()


def test_imagenet_transforms_give_the_pixels_of_the_plain_pil_and_numpy_version():
  """Fewer copies per image (no convert() of RGB images, the flip in PIL) and the same pixels as the first
  version: decode, convert('RGB'), resize, crop, resize, np.asarray, then a numpy flip."""
  def reference(record, rng):
    import io
    image = transforms.resize_shorter(Image.open(io.BytesIO(record)).convert('RGB'))
    top, left, h, w = transforms.random_resized_crop_box(image.size[0], image.size[1], rng)
    out = np.asarray(image.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR), np.uint8)
    flips.append(rng.random() < 0.5)
    return np.ascontiguousarray(out[:, ::-1] if flips[-1] else out)

  rng = np.random.default_rng(5)
  arr = np.clip(rng.normal(128, 60, (150, 200, 3)), 0, 255).astype(np.uint8)
  records = [_encoded(arr, 'JPEG'), _encoded(arr, 'JPEG', 'L'), _encoded(arr, 'JPEG', 'CMYK'),
             _encoded(arr, 'PNG')]
  flips = []
  for record in records:
    for seed in range(6):
      got = transforms.imagenet_train(record, np.random.default_rng([seed, 1]))
      want = reference(record, np.random.default_rng([seed, 1]))
      np.testing.assert_array_equal(got, want)
    import io
    np.testing.assert_array_equal(transforms.imagenet_eval(record), np.asarray(transforms.center_crop(
        transforms.resize_shorter(Image.open(io.BytesIO(record)).convert('RGB'))), np.uint8))
  assert any(flips) and not all(flips)


def test_cifar_train_is_a_padded_crop_and_flip():
  image = np.random.RandomState(1).randint(1, 256, (32, 32, 3)).astype(np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  flips = 0
  for seed in range(40):
    out = transforms.cifar_train(image, np.random.default_rng(seed))
    assert out.shape == (32, 32, 3)
    windows = [padded[t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
    plain = any(np.array_equal(out, w) for w in windows)
    flipped = any(np.array_equal(out[:, ::-1], w) for w in windows)
    assert plain or flipped
    flips += flipped and not plain
  assert 5 < flips < 35
  np.testing.assert_array_equal(transforms.cifar_eval(image), image)


# -- errors ------------------------------------------------------------------------------------------------

def test_unprepared_tfds_data_set_is_a_clear_error(tmp_path):
  config = cub200.get_config()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(DataError) as e:
    create_dataset(config.dataset, seed=0)
  msg = str(e.value)
  assert 'caltech_birds2011' in msg and str(tmp_path / 'tfds') in msg
  assert sources.prepare_command('caltech_birds2011', str(tmp_path / 'tfds')) in msg and 'download=True' in msg


def test_manual_download_instructions_are_included():
  class Builder:
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Register at the site and download images.tar.'
  msg = str(sources._not_prepared('some_set', '/data/tfds', Builder()))  # pylint: disable=protected-access
  assert 'Register at the site and download images.tar.' in msg
  assert '/data/tfds/downloads/manual' in msg


def test_missing_caltech256_folder_is_a_clear_error(tmp_path):
  config = caltech256.get_config()
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(DataError) as e:
    create_dataset(config.dataset, seed=0)
  msg = str(e.value)
  assert str(tmp_path) in msg and sources.CALTECH256_URL in msg and '256_ObjectCategories' in msg


def test_class_subset_is_relabelled(caltech_dir):
  data = make(caltech256, data_dir=caltech_dir, train_per_class=2, classes=(4, 1))
  assert data.num_classes == 2
  keys = list(data.keys('train')) + list(data.keys('validation')) + list(data.keys('test'))
  assert {k.split('/')[0] for k in keys} == {'002.class2', '005.class5'}
  for split in ('train', 'validation', 'test'):
    for key, label in zip(data.keys(split), data.splits[split].labels):
      assert label == (0 if key.startswith('005.') else 1)


def test_unknown_data_set_is_a_clear_error():
  config = cifar10.get_config()
  config.dataset.name = 'imagenet'
  with pytest.raises(DataError, match="Unknown data set 'imagenet'"):
    create_dataset(config.dataset, seed=0)


def test_tensorflow_is_told_to_see_no_accelerator_before_tfds_opens_a_data_set(monkeypatch, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(tf.config, 'set_visible_devices', lambda devices, kind: calls.append((list(devices), kind)))

  def builder(name, data_dir):
    calls.append(('builder', name))
    raise RuntimeError('no such data set here')

  monkeypatch.setattr(tfds, 'builder', builder)
  sources.hide_accelerators_from_tensorflow.cache_clear()
  try:
    for _ in range(2):
      with pytest.raises(DataError, match='TFDS could not open it'):
        sources.read_tfds_if_prepared('stanford_dogs', sources.SPECS['stanford_dogs'], str(tmp_path))
  finally:
    sources.hide_accelerators_from_tensorflow.cache_clear()
  # Once per process, before the first builder: no GPU and no TPU for TensorFlow.
  assert calls == [([], 'GPU'), ([], 'TPU'), ('builder', 'stanford_dogs'), ('builder', 'stanford_dogs')]
