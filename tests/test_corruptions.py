"""Common corruptions (autolora_jax/corruptions.py): the 15 corruptions (seeded, shape, dtype and range kept,
severity), TFDS's CIFAR-10-C through mock_data, the config checks, the heat map, the tables and a tiny run."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

import tiny_runs
from autolora_jax import compare, compat, config_checks, corruptions, reporting, sampling
from autolora_jax import workdir as workdir_lib
from autolora_jax.configs import default
from autolora_jax.data.memory import ArrayDataset, load_digits, load_mnist5k
from autolora_jax.errors import ConfigError, DataError

# Corruptions whose images do not depend on the seed.
DETERMINISTIC = {'defocus_blur', 'zoom_blur', 'brightness', 'contrast', 'pixelate', 'jpeg_compression'}
# Mean |corrupted - original| grows strictly with the severity on 28x28 and 32x32 images for these; the others
# follow CIFAR-10-C's parameters, which are not monotone in that metric (see test_severity_...).
MONOTONE = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'zoom_blur', 'snow', 'fog',
            'brightness', 'contrast', 'jpeg_compression')


@pytest.fixture(scope='module')
def images():
  """uint8 28x28 MNIST digits, float32 8x8 digits and smooth uint8 32x32 colour images (16 of each)."""
  rng = np.random.default_rng(0)
  smooth = ndimage.gaussian_filter(rng.random((16, 32, 32, 3)), (0, 2, 2, 0))
  natural = (np.clip(smooth * 3 - 1, 0, 1) * 255).astype(np.uint8)
  return {'mnist': load_mnist5k()[0][:16], 'digits': load_digits()[0][:16], 'natural': natural}


def _unit(x):
  return x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)


def _distance(original, corrupted):
  return float(np.abs(_unit(corrupted) - _unit(original)).mean())


@pytest.mark.parametrize('name', corruptions.CORRUPTIONS)
def test_each_corruption_is_seeded_and_keeps_shape_dtype_and_range(name, images):
  for kind, x in images.items():
    out = corruptions.corrupt(x, name, 3, seed=5)
    assert out.shape == x.shape and out.dtype == x.dtype, kind
    assert 0 <= _unit(out).min() and _unit(out).max() <= 1, kind
    np.testing.assert_array_equal(out, corruptions.corrupt(x, name, 3, seed=5))  # the same images again
    # Per-image random numbers from the images' positions: any batching gives the same images.
    np.testing.assert_array_equal(out[5:9], corruptions.corrupt(x[5:9], name, 3, seed=5, index=range(5, 9)))
    other = corruptions.corrupt(x, name, 3, seed=6)
    if name in DETERMINISTIC:
      np.testing.assert_array_equal(out, other)
    else:
      assert not np.array_equal(out, other), kind
  # uint8 and float [0, 1] inputs give the same images, up to the uint8 rounding
  x = images['mnist']
  from_float = corruptions.corrupt(x.astype(np.float32) / 255, name, 3, seed=5)
  assert from_float.dtype == np.float32
  assert np.abs(_unit(corruptions.corrupt(x, name, 3, seed=5)) - from_float).max() <= 0.5 / 255 + 1e-6


def test_severity_moves_the_images_away_from_the_originals(images):
  for kind in ('mnist', 'natural'):
    x = images[kind]
    d = {name: [_distance(x, corruptions.corrupt(x, name, s)) for s in corruptions.SEVERITIES]
         for name in corruptions.CORRUPTIONS}
    for name in MONOTONE:
      assert all(b > a for a, b in zip(d[name], d[name][1:])), (kind, name, d[name])
    # glass_blur: CIFAR-10-C's severities 1-3 shuffle once (blur sigma 0.05-0.4, hardly a blur at 32 x 32),
    # 4 and 5 twice: two steps, not five.
    g = d['glass_blur']
    assert min(g[3:]) > 1.3 * max(g[:3]), (kind, g)
    # motion_blur: severities 3 and 4 share sigma 2 (radius 6 -> 8 adds taps of weight < 1%).
    m = d['motion_blur']
    assert m[0] < m[1] < m[2] < m[4] and m[3] < m[4] and abs(m[3] - m[2]) < 0.05 * m[2], (kind, m)
    # pixelate: at 28 x 28 severities 1 and 2 box-filter down to 26 and 25 pixels, whose round trips differ
    # by about as much, in either order; from severity 2 on the difference grows.
    p = d['pixelate']
    assert p[1] < p[2] < p[3] < p[4] and p[0] < p[4], (kind, p)
    # elastic_transform: CIFAR-10-C's random affine part shrinks with the severity (8% -> 3% of the side) as
    # its displacement field grows, so the mean difference falls; every severity moves the image.
    assert min(d['elastic_transform']) > 0.01, (kind, d['elastic_transform'])
  # frost blends x c0 + frost x c1 (c0 falls as c1 rises): on black images the frost added grows with c1
  # (0.2, 0.3, 0.4, 0.4, 0.45).
  black = np.zeros((64, 32, 32, 3), np.uint8)
  f = [_distance(black, corruptions.corrupt(black, 'frost', s)) for s in corruptions.SEVERITIES]
  assert f[0] < f[1] < min(f[2], f[3]) and max(f[2], f[3]) < f[4] and abs(f[2] - f[3]) < 0.05 * f[2], f
  # 8 x 8 digits: every corruption runs; pixelate and zoom_blur have steps (int(8 c) pixels; zoom_blur's
  # severity 1 rounds back to 8 x 8: the image itself).
  x = images['digits']
  for name in corruptions.CORRUPTIONS:
    assert _distance(x, corruptions.corrupt(x, name, 5)) > 0.01, name


def test_generated_batches_are_the_sampled_points_corrupted_whatever_the_batch(images):
  x, y = images['digits'], np.arange(16, dtype=np.int32) % 3
  data = ArrayDataset({'test': (x, y)}, num_classes=3)
  settings = corruptions.Settings(('glass_blur', 'fog'), (2,), seed=3, num_points=11)
  idx = sampling.sample_points(y, 11, seed=3)  # a class-stratified sample, as AutoAttack's points
  assert np.bincount(y[idx]).tolist() == [4, 4, 3]
  expected = corruptions.corrupt(x[idx], 'fog', 2, seed=3, index=idx)
  for batch_size in (4, 16):
    ev = corruptions.CorruptionEvaluation(settings, data, batch_size)
    np.testing.assert_array_equal(ev.indices(), idx)
    batches = list(ev.batches('fog', 2))
    assert len(batches) == -(-11 // batch_size)
    mask = np.concatenate([b['mask'] for b in batches]) > 0
    assert mask.sum() == 11 and mask[:11].all()
    got = np.concatenate([b['image'] for b in batches])[:11]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:11], y[idx])
    assert ev.sources == {'fog': ['generated']} and ('fog', 2) in ev._cache  # kept for the next checkpoint
    np.testing.assert_array_equal(np.concatenate([b['image'] for b in ev.batches('fog', 2)])[:11], expected)


def test_imagenet_sized_images_take_imagenet_c_parameters():
  assert corruptions.table_for(32, 32) == 'cifar' and corruptions.table_for(224, 224) == 'imagenet'
  x = (np.random.default_rng(0).random((2, 128, 128, 3)) * 255).astype(np.uint8)
  for name in ('gaussian_noise', 'contrast', 'elastic_transform'):
    a = corruptions.corrupt(x, name, 5)  # 128 a side: ImageNet-C's (stronger) parameters
    b = corruptions.corrupt(x, name, 5, table='cifar')
    assert a.shape == x.shape and not np.array_equal(a, b)


def test_tfds_cifar10_corrupted_through_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  assert corruptions.tfds_config_name('glass_blur', 3) == 'frosted_glass_blur_3'
  assert corruptions.tfds_config_name('elastic_transform', 1) == 'elastic_1'
  assert corruptions.tfds_config_name('fog', 5) == 'fog_5'
  rng = np.random.default_rng(0)
  clean = ArrayDataset({'test': ((rng.random((24, 32, 32, 3)) * 255).astype(np.uint8), rng.integers(0, 10, 24))},
                       num_classes=10)  # as many test points as the mocked CIFAR-10-C
  settings = corruptions.Settings(('fog', 'elastic_transform'), (1, 5), dataset='cifar10', data_dir=str(tmp_path))
  # Not prepared: 'auto' computes the corruptions, 'tfds' says how to prepare them.
  ev = corruptions.CorruptionEvaluation(settings, clean, 10)
  assert sum(int(b['mask'].sum()) for b in ev.batches('fog', 1)) == 24
  assert ev.sources == {'fog': ['generated']}
  strict = corruptions.CorruptionEvaluation(settings._replace(source='tfds'), clean, 10)
  with pytest.raises(DataError, match='cifar10_corrupted/fog_1 is not prepared.*download_and_prepare'):
    list(strict.batches('fog', 1))
  with tfds.testing.mock_data(num_examples=24):
    images, labels = corruptions.read_tfds('elastic_transform', 5, str(tmp_path))
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    for source in ('auto', 'tfds'):  # prepared (mocked): the published images, uint8 as CIFAR-10's
      ev = corruptions.CorruptionEvaluation(settings._replace(source=source, num_points=20), clean, 10)
      batches = list(ev.batches('elastic_transform', 5))
      assert ev.sources == {'elastic_transform': ['tfds:cifar10_corrupted']}
      assert len(batches) == 2 and sum(int(b['mask'].sum()) for b in batches) == 20  # the sampled 20 points
      assert all(b['image'].dtype == np.uint8 and b['image'].shape == (10, 32, 32, 3) for b in batches)
      idx = ev.indices()
      np.testing.assert_array_equal(np.concatenate([b['image'] for b in batches]), images[idx])
      np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), labels[idx])
    # A class selection relabels the published labels as the data set does.
    ev = corruptions.CorruptionEvaluation(settings._replace(classes=(3, 7)), clean, 10)
    got = np.concatenate([b['label'][b['mask'] > 0] for b in ev.batches('fog', 5)])
    np.testing.assert_array_equal(got, np.where(labels[np.isin(labels, (3, 7))] == 3, 0, 1))
    # Generated, for another data set, whatever TFDS holds.
    ev = corruptions.CorruptionEvaluation(settings._replace(dataset='cifar100'), clean, 10)
    list(ev.batches('fog', 1))
    assert ev.sources == {'fog': ['generated']}


def _config(**eval_keys):
  config = tiny_runs.tiny_config()
  for key, value in eval_keys.items():
    config.eval[key] = value
  return config


@pytest.mark.parametrize('keys, match', [
    ({'corruptions': ('gaussian_noise', 'gausian_blur')}, "'gausian_blur', which is not a corruption.*defocus_blur"),
    ({'corruptions': ('fog',), 'severities': (0, 3)}, r'severities=\(0, 3\).*1 \(mildest\) to 5'),
    ({'corruptions': ('fog',), 'severities': (6,)}, 'severities'),
    ({'corruptions': ('fog',), 'severities': ()}, 'non-empty'),
    ({'corruptions': ('fog',), 'corruption_seed': -1}, 'corruption_seed must be an integer >= 0'),
    ({'corruptions': ('fog',), 'corruption_points': -5}, 'corruption_points'),
    ({'corruptions': ('fog',), 'corruption_source': 'download'}, 'corruption_source'),
    ({'corruptions': ('fog',), 'corruption_source': 'tfds'}, "holds them for cifar10 only.*name=digits"),
])
def test_bad_corruption_settings_are_config_errors(keys, match):
  with pytest.raises(ConfigError, match=match):
    config_checks.validate(_config(**keys))


def test_corruption_settings_resolve():
  config = _config()
  config_checks.validate(config)
  assert not corruptions.settings(config).enabled  # off by default
  config = _config(corruptions=('all',), severities=(5, 1, 5))
  config_checks.validate(config)
  s = corruptions.settings(config)
  assert s.corruptions == corruptions.CORRUPTIONS and s.severities == (1, 5) and s.dataset == 'digits'
  config = _config(corruptions=('jpeg_compression,fog',))  # --config.eval.corruptions=jpeg_compression,fog
  config_checks.validate(config)
  assert corruptions.settings(config).corruptions == ('fog', 'jpeg_compression')  # in the benchmark's order
  # Images too small for the corruptions (a folder of 4 x 4 images): refused once the data is read.
  tiny = ArrayDataset({'test': (np.zeros((4, 4, 4, 3), np.float32), np.zeros(4, np.int32))}, num_classes=2)
  with pytest.raises(ConfigError, match='4 x 4 pixels.*at least 8 x 8'):
    corruptions.settings(config, tiny, 4)


def test_older_workdirs_without_the_eval_section_resume():
  new = workdir_lib.config_dict(default.get_config())
  old = json.loads(json.dumps(new))
  del old['eval']
  old = compat.upgrade_config(old)  # as the workdir reads it
  assert workdir_lib.config_differences(old, new) == []
  changed = default.get_config()
  changed.eval.corruptions = ('fog',)
  assert workdir_lib.config_differences(old, workdir_lib.config_dict(changed)) == [
      "eval.corruptions: [] -> ['fog']"]


def _results(best, final=None):
  results = {'dataset': 'digits', 'corruptions': {'parameters': 'CIFAR-10-C', 'num_points': 10}}
  for name, table in (('best', best), ('final', final)):
    if table is not None:
      values = [v for t in table.values() for v in t.values()]
      results[name] = {'epoch': 1 if name == 'best' else 2,
                       'test': {'clean': 0.9, 'pgd10': 0.5, 'corruptions': table,
                                'corruption_mean': float(np.mean(values))}}
  return results


def test_heatmap_draws_the_numbers_of_results_json(tmp_path):
  best = {'fog': {'1': 0.8, '5': 0.4}, 'gaussian_noise': {'1': 0.7, '5': 0.2}, 'contrast': {'1': 0.6, '5': 0.1}}
  final = {'fog': {'1': 0.75, '5': 0.35}, 'gaussian_noise': {'1': 0.65, '5': 0.3}, 'contrast': {'1': 0.5, '5': 0.05}}
  results = json.loads(json.dumps(_results(best, final)))  # as read back from results.json
  names, severities, matrix = corruptions.heatmap_matrix(results, 'best')
  assert names == ['gaussian_noise', 'fog', 'contrast'] and severities == [1, 5]  # the benchmark's order
  np.testing.assert_array_equal(matrix, [[0.7, 0.2], [0.8, 0.4], [0.6, 0.1]])
  path = str(tmp_path / 'corruptions.png')
  drawn = corruptions.plot_heatmap(results, path)
  assert os.path.getsize(path) > 0 and set(drawn) == {'best', 'final'}  # one panel per checkpoint
  for name in ('best', 'final'):
    np.testing.assert_allclose(drawn[name], 100 * corruptions.heatmap_matrix(results, name)[2])
  assert corruptions.plot_heatmap({'best': {'test': {'clean': 0.9}}}, str(tmp_path / 'none.png')) == {}


def test_tables_show_the_mean_corruption_accuracy():
  results = _results({'fog': {'1': 0.8, '5': 0.4}})
  table = reporting.results_table(results)
  assert 'corr.' in table.splitlines()[0] and '60.00%' in table
  assert 'corr.' not in reporting.results_table({'best': {'epoch': 1, 'test': {'clean': 0.9}}})
  with_corr = {'autolora': {0: {**results, 'final': results['best']}, 1: {**results, 'final': results['best']}}}
  summary = compare.summarize(with_corr)
  assert summary['methods']['autolora']['best']['corruption_mean'] == {'mean': pytest.approx(0.6), 'std': 0.0, 'n': 2}
  text = compare.markdown({**summary, 'dataset': 'digits'})
  assert 'best / final: corruptions (mean)' in text and '60.00 ± 0.00 / 60.00 ± 0.00' in text
  plain = {'autolora': {0: {'best': {'epoch': 1, 'test': {'clean': 0.9, 'pgd10': 0.5}},
                            'final': {'epoch': 1, 'test': {'clean': 0.9, 'pgd10': 0.5}}}}}
  assert 'corruptions' not in compare.markdown({**compare.summarize(plain), 'dataset': 'digits'})


def test_tiny_run_writes_the_corruption_results(tmp_path, capsys):
  from autolora_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_runs.tiny_config(epochs=1)
  config.autoattack.enabled = False
  config.eval.corruptions = ('gaussian_noise', 'glass_blur', 'jpeg_compression')
  config.eval.severities = (1, 5)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  printed = capsys.readouterr().out
  header = next(line for line in printed.splitlines() if line.startswith('checkpoint'))
  assert 'corr.' in header
  with open(os.path.join(workdir, 'results.json')) as f:
    on_disk = json.load(f)
  for name in ('best', 'final'):
    table = on_disk[name]['test']['corruptions']
    assert list(table) == ['gaussian_noise', 'glass_blur', 'jpeg_compression']
    assert all(list(t) == ['1', '5'] and all(0 <= v <= 1 for v in t.values()) for t in table.values())
    assert on_disk[name]['test']['corruption_mean'] == pytest.approx(
        np.mean([v for t in table.values() for v in t.values()]))
  settings = on_disk['corruptions']
  assert settings['num_points'] == settings['num_test'] == on_disk['num_test']
  assert settings['parameters'] == 'CIFAR-10-C' and settings['image_shape'] == [8, 8, 3]
  assert settings['source'] == {n: 'generated' for n in table}
  assert settings['fidelity'] == {'gaussian_noise': 'exact', 'glass_blur': 'exact', 'jpeg_compression': 'exact'}
  assert set(settings['seconds']) == {'best'} and settings['seconds']['best'] > 0  # one epoch: final = best
  path = os.path.join(workdir, corruptions.HEATMAP_FILE)
  assert os.path.getsize(path) > 0
  drawn = corruptions.plot_heatmap(on_disk, str(tmp_path / 'again.png'))
  np.testing.assert_allclose(drawn['best'], 100 * corruptions.heatmap_matrix(on_disk, 'best')[2])
  assert results['best']['test']['corruptions'] == table
