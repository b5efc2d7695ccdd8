"""AutoAttack's points: a seeded sample stratified by class (sampling.sample_points), the same whatever the
batch size, device or process count, and the points the evaluation and `autolora_jax.load` attack."""

import numpy as np
import pytest

from autolora_jax import sampling
from autolora_jax.data.memory import ArrayDataset


def class_sorted_labels(counts):
  return np.concatenate([np.full(c, k, np.int32) for k, c in enumerate(counts)])


@pytest.mark.parametrize('counts,n', [((100, 100, 100, 100, 100), 200), ((50, 30, 20), 10),
                                       ((7, 3, 90), 25), ((1, 1, 1, 97), 4)])
def test_every_class_in_proportion_on_a_class_sorted_split(counts, n):
  labels = class_sorted_labels(counts)
  idx = sampling.sample_points(labels, n, seed=0)
  assert len(idx) == n and len(set(idx.tolist())) == n and np.all(np.diff(idx) > 0)
  got = np.bincount(labels[idx], minlength=len(counts))
  exact = np.asarray(counts) * n / sum(counts)
  assert np.all(np.abs(got - exact) < 1)  # each class within one point of its share
  assert got.sum() == n


def test_the_first_n_points_of_a_class_sorted_split_cover_few_classes_the_sample_all():
  labels = class_sorted_labels((100,) * 5)
  first = sampling.sample_points(labels, 200, how='first')
  assert set(labels[first].tolist()) == {0, 1}
  assert set(labels[sampling.sample_points(labels, 200)].tolist()) == {0, 1, 2, 3, 4}


def test_the_sample_is_a_function_of_labels_n_and_seed_alone():
  labels = np.random.default_rng(3).integers(0, 7, 1000)
  a = sampling.sample_points(labels, 150, seed=4)
  np.testing.assert_array_equal(a, sampling.sample_points(labels.copy(), 150, seed=4))
  assert not np.array_equal(a, sampling.sample_points(labels, 150, seed=5))
  np.testing.assert_array_equal(sampling.sample_points(labels, 0), np.arange(1000))
  np.testing.assert_array_equal(sampling.sample_points(labels, 5000), np.arange(1000))
  with pytest.raises(ValueError, match='stratified'):
    sampling.sample_points(labels, 10, how='random')


def test_class_shares_round_by_largest_remainders_and_cap_at_the_class_size():
  np.testing.assert_array_equal(sampling.class_shares(np.array([10, 10, 10]), 4), [2, 1, 1])
  np.testing.assert_array_equal(sampling.class_shares(np.array([1, 99]), 50), [1, 49])


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_the_same_points_whatever_the_batch_size_or_process_count(process_count, monkeypatch):
  labels = class_sorted_labels((30, 20, 10, 40))
  images = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1)
  data = ArrayDataset({'test': (images, labels)}, num_classes=4)
  idx = sampling.sample_points(labels, 24, seed=1)
  seen = []
  for p in range(process_count):
    monkeypatch.setattr(sampling.jax, 'process_index', lambda p=p: p)
    monkeypatch.setattr(sampling.jax, 'process_count', lambda: process_count)
    x, y, index = sampling.sample_of(data, 'test', idx)
    np.testing.assert_array_equal(x[:, 0, 0, 0], index)  # the image at each position is that point's
    np.testing.assert_array_equal(y, labels[index])
    for global_batch in (4, 8):
      batches = list(sampling.point_batches(x, y, len(idx), global_batch))
      assert len(batches) == -(-(-(-len(idx) // process_count)) // (global_batch // process_count))
      kept = np.concatenate([b['image'][b['mask'] > 0][:, 0, 0, 0] for b in batches])
      np.testing.assert_array_equal(kept, index)
    seen.append(index)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), idx)
