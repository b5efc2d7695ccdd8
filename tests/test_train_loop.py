"""The whole loop on the digits demo data with a tiny model: outputs, resume, and clear errors."""

import json
import os

import numpy as np
import pytest

from autolora_jax import checkpoints, reporting, train
from autolora_jax.errors import ConfigError, WorkdirError
from tests import helpers, tiny_runs

TIMING_KEYS = ('train_seconds', 'images_per_second')


def tiny_config(**overrides):
  config = tiny_runs.digits_demo()
  config.model.width = 8
  config.model.input_size = 8
  config.model.conv_impl = 'native'  # XLA's convolutions compile in about half the time of im2col's
  config.pretrain.epochs = 1
  config.auto_lr.max_epochs = 3
  config.auto_lr.window = 1  # checkpoints after epochs 2 and 3: the schedule decides during the run
  config.attack.train_steps = 2
  config.attack.eval_steps = 3
  config.batch_size = 128
  config.eval_batch_size = 256
  config.progress = False
  config.tensorboard = False
  config.autoattack.num_points = 16  # AutoAttack (the demo's fast version) on a few points: in the loop, cheap
  config.autoattack.batch_size = 16
  return tiny_runs.with_overrides(config, overrides)


def _strip(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _final_params(workdir):
  ckpts = checkpoints.Checkpoints(workdir)
  meta = ckpts.restore_meta('latest')
  step = ckpts.latest_step()
  path = os.path.join(workdir, 'checkpoints', 'latest', str(step), 'state')
  ckpts.close()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(path)
  return restored['params'], meta


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  results = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


@pytest.mark.slow
def test_outputs_of_a_run(uninterrupted):
  workdir, results = uninterrupted
  records = reporting.MetricsLog(workdir).read()
  assert [r['epoch'] for r in records] == [0, 1, 2, 3]
  for key in ('lr', 'l1', 'l2', 'train_loss', 'train_seconds', 'val_clean_adv', 'val_clean_nat', 'val_pgd10',
              'reload_best', 'condition', 'next_lr', 'stop'):
    assert key in records[1], key
  assert records[-1]['stop'] and not records[1]['stop']
  on_disk = json.load(open(os.path.join(workdir, 'results.json')))
  for name in ('best', 'final'):
    test = on_disk[name]['test']
    assert 0.0 <= test['pgd10'] <= test['clean'] <= 1.0
  assert on_disk['final']['epoch'] == 3
  assert on_disk['best']['epoch'] == max(records[1:], key=lambda r: r['val_pgd10'])['epoch'] or \
      any(r['reload_best'] for r in records)
  assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 1000
  assert results['final']['test'] == on_disk['final']['test']


def test_scalars_follow_the_natural_branch_accuracy(uninterrupted):
  workdir, _ = uninterrupted
  records = reporting.MetricsLog(workdir).read()
  assert records[0]['l1'] == pytest.approx(1 - records[0]['val_clean_nat'])
  for prev, cur in zip(records[1:], records[2:]):
    if not prev['reload_best']:  # after a reload the scalars come from the best epoch's accuracy
      assert cur['l1'] == pytest.approx(1 - prev['val_clean_nat'])
      assert cur['l2'] == pytest.approx(6 * prev['val_clean_nat'])
    assert cur['lr'] == prev['next_lr']


@pytest.mark.slow
def test_resume_after_a_stop_matches_an_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
  straight_dir, straight_results = uninterrupted
  workdir = str(tmp_path / 'resumed')
  original_save = checkpoints.Checkpoints.save

  class Stop(Exception):
    pass

  def save_then_die(self, which, step, state, meta):
    original_save(self, which, step, state, meta)
    if which == 'latest' and meta['epoch'] == 2:
      raise Stop()

  monkeypatch.setattr(checkpoints.Checkpoints, 'save', save_then_die)
  with pytest.raises(Stop):
    train.train_and_evaluate(tiny_config(), workdir)
  assert [r['epoch'] for r in reporting.MetricsLog(workdir).read()] == [0, 1, 2]
  monkeypatch.setattr(checkpoints.Checkpoints, 'save', original_save)
  resumed_results = train.train_and_evaluate(tiny_config(), workdir)

  assert _strip(reporting.MetricsLog(workdir).read()) == _strip(reporting.MetricsLog(straight_dir).read())
  for name in ('best', 'final'):
    assert resumed_results[name] == straight_results[name]
  p_resumed, meta_resumed = _final_params(workdir)
  p_straight, meta_straight = _final_params(straight_dir)
  for a, b in zip(helpers.jax.tree_util.tree_leaves(p_resumed), helpers.jax.tree_util.tree_leaves(p_straight)):
    np.testing.assert_array_equal(a, b)
  assert meta_resumed == meta_straight


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(WorkdirError, match='cannot be written'):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'))


def test_bad_config_values_are_clear_errors(tmp_path):
  with pytest.raises(ConfigError, match='lora_rank'):
    train.train_and_evaluate(tiny_config(**{'model.lora_rank': 0}), str(tmp_path))
  with pytest.raises(ConfigError, match=r'attack.eps must lie in \(0.0, 1.0\]'):
    train.train_and_evaluate(tiny_config(**{'attack.eps': 2.0}), str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing written before the error


def test_run_py_unknown_config_key_is_a_clear_error(tmp_path):
  proc = helpers.run_python(
      'import sys, runpy; sys.argv = ["run.py", "--config=configs/demo.py", "--config.model.widht=3", '
      f'"--workdir={tmp_path}"]; runpy.run_path("run.py", run_name="__main__")')
  assert proc.returncode == 2
  assert 'widht' in proc.stderr and 'Did you mean "width"' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_batch_that_does_not_divide_the_devices_is_a_clear_error(tmp_path):
  code = ('from tests.test_train_loop import tiny_config\n'
          'from autolora_jax import train\n'
          f'train.train_and_evaluate(tiny_config(batch_size=6), {str(tmp_path)!r})\n')
  proc = helpers.run_python(code, devices=4)
  assert proc.returncode != 0
  assert 'config.batch_size=6 does not divide over the 4 devices' in proc.stderr
  assert 'e.g. --config.batch_size=4' in proc.stderr
