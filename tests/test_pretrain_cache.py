"""The in-process pre-trained FE's cache: one folder per fingerprint, shared by every method and seed."""

import os

import jax
import numpy as np

import tiny_runs
from autolora_jax import experiment, models, ops, pretrain


def test_cache_folder_is_shared_by_seeds_and_methods_and_changes_with_the_fe(tmp_path):
  config = tiny_runs.digits_demo()
  base = experiment.pretrain_folder(config, str(tmp_path / 'run_a'))
  assert os.path.dirname(base) == str(tmp_path / 'run_a' / 'pretrain')
  other = tiny_runs.digits_demo()
  other.seed, other.method = 3, 'vanilla_rft'  # fine-tuning settings: the same FE
  other.fixed.lr = 0.03
  assert experiment.pretrain_folder(other, str(tmp_path / 'run_a')) == base
  for key, value in (('pretrain.epochs', 7), ('pretrain.seed', 1), ('model.width', 4), ('attack.eps', 0.2),
                     ('pretrain.dataset.classes', (0, 1))):
    changed = tiny_runs.with_overrides(tiny_runs.digits_demo(), {key: value})
    assert experiment.pretrain_folder(changed, str(tmp_path / 'run_a')) != base, key
  shared = tiny_runs.with_overrides(tiny_runs.digits_demo(), {'pretrain.cache_dir': str(tmp_path / 'fe')})
  folder = experiment.pretrain_folder(shared, str(tmp_path / 'run_b'))
  assert os.path.dirname(folder) == str(tmp_path / 'fe')
  assert os.path.basename(folder) == os.path.basename(base)  # the key is not part of the fingerprint


def test_init_variables_depend_on_the_seed_alone_not_the_convolution():
  a = pretrain.init_variables(models.resnet18(3, width=4, input_size=8, stem='cifar'), 8, 0)
  im2col = models.resnet18(3, width=4, input_size=8, stem='cifar', conv_fn=ops.conv.im2col_conv)
  b = pretrain.init_variables(im2col, 8, 0)
  c = pretrain.init_variables(models.resnet18(3, width=4, input_size=8, stem='cifar'), 8, 1)
  leaves = lambda v: [np.asarray(x) for x in jax.tree_util.tree_leaves(v)]  # noqa: E731
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  kernel_a, kernel_c = a['params']['conv1']['kernel'], c['params']['conv1']['kernel']
  assert not np.array_equal(kernel_a, kernel_c)
  # torchvision's init: N(0, 2 / fan_out) for the convolutions.
  k = a['params']['layer1_0']['conv1']['kernel']
  assert abs(np.std(k) / np.sqrt(2 / (9 * k.shape[-1])) - 1) < 0.2


def test_a_moved_cache_folder_is_not_another_run():
  from autolora_jax import workdir  # pylint: disable=g-import-not-at-top
  a = workdir.config_dict(tiny_runs.digits_demo())
  b = workdir.config_dict(tiny_runs.with_overrides(tiny_runs.digits_demo(), {'pretrain.cache_dir': '/x'}))
  assert workdir.config_differences(a, b) == []
  c = workdir.config_dict(tiny_runs.with_overrides(tiny_runs.digits_demo(), {'pretrain.seed': 5}))
  assert workdir.config_differences(a, c) == ['pretrain.seed: 0 -> 5']
