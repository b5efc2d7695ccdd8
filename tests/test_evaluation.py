"""Test-split evaluation: AutoAttack in the end-of-training report and `run.py --mode=eval` on a workdir."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tiny_runs
from autolora_jax import (
  api,
  autoattack,
  checkpoints,
  config_checks,
  convert,
  evaluation,
  models,
  pretrain,
  reporting,
  sampling,
  train,
)
from autolora_jax import data as datasets
from autolora_jax import workdir as workdir_lib
from autolora_jax.data.core import to_unit
from autolora_jax.data.memory import ArrayDataset
from autolora_jax.errors import ConfigError, WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """The demo shrunk: width 4 at 8x8, no pre-training, one epoch, short PGD, AA fast on 16 test points."""
  config = tiny_runs.digits_demo()
  config.model.width = 4
  config.model.input_size = 8
  config.model.conv_impl = 'native'
  config.pretrain.epochs = 0
  config.auto_lr.max_epochs = 1
  config.auto_lr.lr0 = 0.05
  config.attack.train_steps = 1
  config.attack.eval_steps = 2
  config.eval_batch_size = 128
  config.progress = False
  config.tensorboard = False
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 16
  config.autoattack.batch_size = 16
  return config


def test_autoattack_config_is_validated():
  config = tiny_config()
  config_checks.validate(config)
  config.autoattack.version = 'ultra'
  with pytest.raises(ConfigError, match='autoattack.version'):
    config_checks.validate(config)
  config = tiny_config()
  config.autoattack.num_points = -1
  with pytest.raises(ConfigError, match='autoattack.num_points'):
    config_checks.validate(config)
  config = tiny_config()
  config.autoattack.batch_size = 0
  with pytest.raises(ConfigError, match='autoattack.batch_size'):
    config_checks.validate(config)
  for bad in (('apgd',), ('apgd-ce', 'pgd')):  # names that are not AutoAttack's
    config = tiny_config()
    config.eval.val_attacks = bad
    with pytest.raises(ConfigError, match=r'config.eval.val_attacks takes a list of names'):
      config_checks.validate(config)


def test_point_batches_hold_the_sampled_points_once_with_a_mask():
  images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) / 10
  labels = np.arange(10, dtype=np.int32) % 3
  data = ArrayDataset({'test': (images, labels)}, num_classes=3)
  for indices in ([0], [1, 4, 5, 9], np.arange(10)):
    x, y, index = sampling.sample_of(data, 'test', np.asarray(indices))
    np.testing.assert_array_equal(x, images[indices])
    np.testing.assert_array_equal(y, labels[indices])
    np.testing.assert_array_equal(index, indices)
    batches = list(sampling.point_batches(x, y, len(indices), global_batch=4))
    assert len(batches) == -(-len(indices) // 4)
    kept = np.concatenate([b['image'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(kept, images[indices])
    assert all(b['image'].shape == (4, 1, 1, 1) for b in batches)


def test_eval_mode_needs_a_trained_workdir(tmp_path):
  with pytest.raises(WorkdirError, match='--mode=eval'):
    evaluation.evaluate_workdir(tiny_config(), str(tmp_path / 'empty'))
  proc = subprocess.run([sys.executable, 'run.py', '--config=configs/demo.py', f'--workdir={tmp_path}',
                         '--mode=eval'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'error: --mode=eval needs a workdir with a training run' in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_training_report_and_eval_mode_write_autoattack(tmp_path, capsys):
  config = tiny_config()
  config.eval.val_attacks = ('apgd-ce',)  # recorded after each validation (checked at the end)
  workdir = str(tmp_path / 'run')
  trained = train.train_and_evaluate(config, workdir)
  printed = capsys.readouterr().out
  assert 'autoattack' in printed and 'version fast' in printed and 'on 16 of' in printed
  assert 'class-stratified sample' in printed
  for name in ('best', 'final'):
    entry = trained[name]
    assert set(entry['test']) >= {'clean', 'pgd10', 'autoattack'}
    assert entry['autoattack']['num_points'] == 16
    assert entry['test']['autoattack'] == entry['autoattack']['robust']
    assert entry['test']['autoattack'] <= entry['autoattack']['clean']
    assert list(entry['autoattack']['accuracy_after']) == ['clean', 'apgd-ce', 'apgd-t']
  # One epoch: the final state is the best checkpoint, evaluated once and reported for both.
  assert trained['best']['epoch'] == trained['final']['epoch'] == 1
  assert trained['final'] == {**trained['best'], 'same_as_best': True}
  for name in ('best', 'final'):  # PGD-10 on AutoAttack's 16 points beside PGD-10 on all test points
    assert 0 <= trained[name]['test']['pgd10_autoattack_points'] <= 1
  for name in ('best', 'final'):  # the clean accuracy on those points is AutoAttack's own starting point
    assert trained[name]['test']['clean_autoattack_points'] == trained[name]['autoattack']['clean']
  settings = dict(trained['autoattack'])
  assert set(settings.pop('seconds')) == {'best'}
  indices = settings.pop('indices')
  assert len(indices) == 16 and indices == sorted(set(indices))
  assert settings == {'version': 'fast', 'norm': 'Linf', 'attacks': ['apgd-ce', 'apgd-t'], 'eps': config.attack.eps,
                      'num_points': 16, 'num_test': trained['num_test'], 'points': 'stratified', 'seed': 0}

  card = open(os.path.join(workdir, 'results.md')).read()
  assert '| best | 1 |' in card and 'class-stratified sample' in card and '## Reproduce' in card

  # --mode=eval on the finished workdir: the same numbers again (same checkpoints, same seed), written into
  # results.json beside what the training run wrote there.
  evaluated = evaluation.evaluate_workdir(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(evaluated))
  assert on_disk['wall_seconds'] == pytest.approx(trained['wall_seconds']) and 'eval_seconds' in on_disk
  for name in ('best', 'final'):
    assert on_disk[name]['epoch'] == trained[name]['epoch']
    assert on_disk[name]['test'] == pytest.approx(trained[name]['test'])
    assert on_disk[name]['autoattack'] == trained[name]['autoattack']

  # config.eval.val_attacks: APGD-CE's robust accuracy on the whole validation split after the epoch, as
  # autoattack.run gives it on those points with the epoch's weights and the run's AutoAttack settings.
  record = tiny_runs.read_metrics(workdir)[1]
  run = api.load(workdir, 'best')  # one epoch: the best checkpoint holds the epoch's weights
  data = datasets.create_dataset(config.dataset, seed=config.seed)
  index = np.arange(data.num_examples('validation'))
  x, y = data.examples('validation', index)
  result = autoattack.run(run.logits_fn, to_unit(x), y, eps=run.eps, norm=run.norm, version='custom',
                          attacks=['apgd-ce'], seed=config.autoattack.seed, batch_size=config.autoattack.batch_size,
                          point_index=index)
  assert record['val_apgd_ce'] == float(np.mean(result.robust)) <= record['val_clean_adv']
  assert reporting.validation_attack_keys(tiny_runs.read_metrics(workdir)) == ['val_apgd_ce']



@pytest.mark.slow
def test_eval_mode_after_the_pretrained_checkpoint_is_gone(tmp_path):
  """The workdir records the input normalisation the pre-trained FE expects (in its checkpoints), the
  config is not changed by the run, and --mode=eval needs neither the FE's file nor a changed config."""
  config = tiny_config()
  config.autoattack.enabled = False
  fe_model = models.resnet18(10, width=config.model.width, input_size=8, stem=config.model.stem, lora_rank=0)
  fe_mean, fe_std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]  # not the config's (ImageNet's)
  fe = str(tmp_path / 'fe')
  convert.save(fe, pretrain.init_variables(fe_model, 8, 3),
               {'arch': convert.arch_for('resnet18', config.model.stem), 'width': config.model.width,
                'num_classes': 10, 'mean': fe_mean, 'std': fe_std, 'layout': 'test', 'source': 'this test'})
  config.pretrained = fe
  before = workdir_lib.config_dict(config)
  workdir = str(tmp_path / 'run')
  trained = train.train_and_evaluate(config, workdir)
  assert workdir_lib.config_dict(config) == before  # nothing wrote into the config
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['mean'] == list(config.model.mean)  # what the user configured
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    for which in ('latest', 'best'):
      assert ckpts.restore_meta(which)['normalization'] == {'mean': fe_mean, 'std': fe_std}
  finally:
    ckpts.close()
  shutil.rmtree(fe)
  evaluated = evaluation.evaluate_workdir(config, workdir)
  for name in ('best', 'final'):
    assert evaluated[name]['test'] == trained[name]['test']  # the same model, normalisation included


def test_l2_config_is_validated_and_resolved():
  from autolora_jax import experiment  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.attack.norm = 'l2'
  config.attack.eps, config.attack.step_size = 0.5, 0.125
  config_checks.validate(config)
  assert experiment.attack_settings(config).norm == 'l2'
  aa = experiment.autoattack_settings(config)
  assert (aa.norm, aa.eps) == ('L2', 0.5)
  config.autoattack.norm, config.autoattack.eps = 'L1', 12.0
  config_checks.validate(config)
  assert (experiment.autoattack_settings(config).norm, experiment.autoattack_settings(config).eps) == ('L1', 12.0)
  for key, value, match in (('attack.norm', 'L2', 'attack.norm'), ('autoattack.norm', 'l1', 'autoattack.norm'),
                            ('attack.eps', 2000.0, 'attack.eps')):
    bad = tiny_runs.with_overrides(tiny_config(), {'attack.norm': 'l2', key: value})
    with pytest.raises(ConfigError, match=match):
      config_checks.validate(bad)
  bad = tiny_runs.with_overrides(tiny_config(), {'autoattack.norm': 'L1'})
  with pytest.raises(ConfigError, match='needs its own radius'):
    config_checks.validate(bad)
  bad = tiny_runs.with_overrides(tiny_config(), {'autoattack.version': 'custom', 'autoattack.attacks': ()})
  with pytest.raises(ConfigError, match='autoattack.attacks'):
    config_checks.validate(bad)


@pytest.mark.slow
def test_l2_robust_fine_tuning_end_to_end(tmp_path):
  """attack.norm='l2': L2 PGD in training and validation, AutoAttack L2 at the end, results.json says so."""
  config = tiny_runs.with_overrides(tiny_config(), {'attack.norm': 'l2', 'attack.eps': 0.5,
                                                    'attack.step_size': 0.125})
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['autoattack']['norm'] == 'L2' and results['autoattack']['version'] == 'fast'
  assert results['autoattack']['eps'] == 0.5
  entry = results['best']
  assert 0 <= entry['test']['autoattack'] <= entry['test']['clean']
  assert list(entry['autoattack']['accuracy_after']) == ['clean', 'apgd-ce', 'apgd-t']
  with open(tmp_path / 'run' / 'results.json') as f:
    assert json.load(f)['autoattack']['norm'] == 'L2'


def test_results_card_names_the_run_its_numbers_and_its_command(tmp_path):
  from autolora_jax import reporting
  results = {'method': 'autolora', 'reference_compat': False, 'dataset': 'mnist5k', 'arch': 'resnet18_cifar',
             'num_test': 500, 'input_shape': [3, 28, 28],
             'threat_model': {'norm': 'linf', 'eps': 0.3, 'step_size': 0.075, 'eval_steps': 10},
             'command': 'autolora-train --config=demo --workdir=/tmp/demo',
             'best': {'epoch': 5, 'test': {'clean': 0.88, 'pgd10': 0.68, 'autoattack': 0.57,
                                           'pgd10_autoattack_points': 0.71}},
             'final': {'epoch': 6, 'test': {'clean': 0.896, 'pgd10': 0.692, 'autoattack': 0.6}},
             'autoattack': {'version': 'fast', 'norm': 'Linf', 'attacks': ['apgd-ce', 'apgd-t'], 'eps': 0.3,
                            'num_points': 200, 'num_test': 500, 'points': 'stratified', 'seed': 0,
                            'indices': list(range(200)), 'seconds': {'best': 31.5, 'final': 200.0}},
             'wall_seconds': 219.1}
  path = reporting.write_results(str(tmp_path), results)
  assert json.load(open(path)) == results
  card = open(tmp_path / 'results.md').read()
  assert card.startswith('# autolora on mnist5k (resnet18_cifar)')
  assert '| best | 5 | 88.00 | 68.00 | 57.00 | 71.00 |' in card
  assert '| final | 6 | 89.60 | 69.20 | 60.00 | – |' in card
  assert 'version fast (apgd-ce, apgd-t), Linf eps 0.3, on 200 of 500 test points, a class-stratified' in card
  assert '- AutoAttack of the final checkpoint: 3.3 min' in card and '3.7 min' in card
  assert '```bash\nautolora-train --config=demo --workdir=/tmp/demo\n```' in card
