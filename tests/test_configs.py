"""Every config loads, validates and builds its model; the dataset configs change only what differs from the
default; run.py with a dataset config, mock TFDS data and an on-the-fly converted checkpoint runs end to end."""

import glob
import importlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from autolora_jax import config_checks, models
from autolora_jax.configs import default
from autolora_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, 'autolora_jax', 'configs', '*.py'))
                 if not p.endswith('__init__.py'))
DATASET_CONFIGS = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'dtd': 'dtd', 'dogs': 'stanford_dogs',
                   'cub200': 'caltech_birds2011', 'caltech256': 'caltech256'}


def flat(config, prefix=''):
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def test_every_dataset_config_exists():
  assert set(DATASET_CONFIGS) <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_validates_and_builds_its_model(name):
  config = importlib.import_module(f'autolora_jax.configs.{name}').get_config()
  config_checks.validate(config)
  dataset = config.dataset.name
  num_classes = sources.SPECS[dataset].num_classes if dataset in sources.SPECS else 5
  model = models.create_model(config.model, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert shapes['params']['head']['kernel'].shape == (config.model.width * 8, num_classes)
  assert any('lora_A' in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes['params']))


@pytest.mark.parametrize('name', sorted(DATASET_CONFIGS))
def test_dataset_configs_change_only_what_differs(name):
  config = importlib.import_module(f'autolora_jax.configs.{name}').get_config()
  changed = {k for k, v in flat(config).items() if flat(default.get_config())[k] != v}
  # TWINS's own settings: the authors' CIFAR scripts differ from their high-resolution ones (configs/default.py)
  twins_cifar = {'twins.lam', 'twins.weight_decay'} if name.startswith('cifar') else set()
  assert 'pretrained' in changed and twins_cifar <= changed <= {'dataset.name', 'pretrained'} | twins_cifar
  assert config.dataset.name == DATASET_CONFIGS[name]
  assert config.model.arch == 'resnet18' and config.pretrained == 'pretrained/resnet18_linf_eps4.0'
  config.model.arch = 'resnet50'  # Table 2: the checkpoint path follows the architecture
  assert config.pretrained == 'pretrained/resnet50_linf_eps4.0'


RUN_UNDER_MOCK = textwrap.dedent('''
    import runpy, sys
    import tensorflow_datasets as tfds
    sys.argv = ['run.py'] + sys.argv[1:]
    with tfds.testing.mock_data(num_examples=12):
      runpy.run_path('run.py', run_name='__main__')
''')


@pytest.mark.slow
def test_run_py_end_to_end_with_mock_data_and_a_converted_checkpoint(tmp_path):
  torch = pytest.importorskip('torch')
  del torch
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  ckpt = str(tmp_path / 'resnet18_linf_eps4.0.ckpt')
  tr.save_robustness(tr.resnet18(width=8, seed=0), ckpt)
  workdir = str(tmp_path / 'work')
  args = ['--config=configs/cub200.py', f'--workdir={workdir}', f'--config.pretrained={ckpt}',
          '--config.model.width=8', '--config.model.input_size=16', '--config.model.conv_impl=native',
          '--config.batch_size=4', '--config.eval_batch_size=8', '--config.dataset.val_fraction=0.25',
          '--config.auto_lr.max_epochs=1', '--config.attack.train_steps=1', '--config.attack.eval_steps=1',
          '--config.progress=False', '--config.tensorboard=False']
  done = subprocess.run([sys.executable, '-c', RUN_UNDER_MOCK, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=540, env={**os.environ, 'PYTHONPATH': ROOT})
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['dataset'] == 'caltech_birds2011' and results['num_test'] == 12
  for which in ('best', 'final'):
    assert results[which]['epoch'] == 1 and 0.0 <= results[which]['test']['clean'] <= 1.0
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['epoch'] for r in lines] == [0, 1]
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['pretrained'] == ckpt and saved['model']['mean'] == list(models.IMAGENET_MEAN)
  assert 'Pre-trained FE' in done.stderr  # the checkpoint was converted and transplanted
