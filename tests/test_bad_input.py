"""Bad input: each case gives its own clear message and leaves the workdir exactly as it was.

The cases run `train_and_evaluate` in this process (one device) on a new folder, an empty folder and, where
the check comes before the workdir's, a folder holding a run; the batch that does not divide the device
count runs run.py in a subprocess with two fake devices.
"""

import hashlib
import json
import os
import re

import jax
import numpy as np
import pytest

import tiny_runs
from autolora_jax import compat, config_checks, models, pretrain, train, workdir
from autolora_jax.errors import CheckpointError, ConfigError, DataError, WorkdirError


def snapshot(path):
  """Every folder and file under `path` with its content hash; None if `path` does not exist."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = 'dir'
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha1(f.read()).hexdigest()
  return out


def make_old_run(path, config):
  """A workdir holding (the files of) an earlier run of `config`."""
  os.makedirs(os.path.join(path, 'checkpoints', 'latest', '5', 'state'))
  with open(os.path.join(path, 'checkpoints', 'latest', '5', 'state', 'commit_success.txt'), 'w') as f:
    f.write('ok')
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'epoch': 0, 'val_clean_adv': 0.5}) + '\n')
  return str(path)


def workdirs(tmp_path, with_run=True):
  """A new folder, an empty folder and (with_run) a folder holding a run of the valid tiny config."""
  os.makedirs(tmp_path / 'empty')
  out = [str(tmp_path / 'new' / 'run'), str(tmp_path / 'empty')]
  if with_run:
    out.append(make_old_run(tmp_path / 'old', tiny_runs.tiny_config()))
  return out


def expect_refusal(config, paths, error, message, **kwargs):
  for path in paths:
    before = snapshot(path)
    with pytest.raises(error, match=re.escape(message)):
      train.train_and_evaluate(config, path, **kwargs)
    assert snapshot(path) == before, path


CONFIG_CASES = [
    ('method', 'autolora2', "config.method='autolora2' is not supported: choose one of ('autolora', "),
    ('model.arch', 'resnet34', "config.model.arch='resnet34' is not supported: choose one of ('convnext_t', "),
    ('model.lora_rank', 0, 'config.model.lora_rank must be a positive integer for AutoLoRa'),
    ('model.lora_rank', -2, 'config.model.lora_rank must be an integer >= 0'),
    ('attack.eps', 0.0, 'config.attack.eps must lie in (0.0, 1.0], got 0.0'),
    ('attack.eps', 8.0, 'config.attack.eps must lie in (0.0, 1.0], got 8.0'),
    ('attack.step_size', -0.01, 'config.attack.step_size must lie in (0.0, 1.0], got -0.01'),
    ('attack.step_size', 2.0, 'config.attack.step_size must lie in (0.0, 1.0], got 2.0'),
    ('model.precision', 'fp32', "config.model.precision='fp32' is not supported: choose one of ('default', "),
    ('model.attention_impl', 'flash', "config.model.attention_impl='flash' is not supported: choose one of "
     "('auto', 'einsum', 'xla', 'cudnn')"),
    ('model.attention_impl', 'cudnn', "config.model.attention_impl='cudnn' needs config.model.dtype='bfloat16'"),
    ('host.metrics_every', 0, 'config.host.metrics_every must be a positive integer, got 0'),
    ('host.prefetch', 0, 'config.host.prefetch must be an integer from 1 to 8'),
    ('host.plot_every', 0, 'config.host.plot_every must be a positive integer, got 0'),
    ('host.decode_threads', -1, 'config.host.decode_threads must be an integer >= 0'),
    ('distributed.initialize', 'sometimes', "config.distributed.initialize='sometimes' is not supported"),
    ('distributed.process_id', 3, 'The process id 3 (config.distributed.process_id or JAX_PROCESS_ID) must '),
]


@pytest.mark.parametrize('key,value,message', CONFIG_CASES)
def test_bad_config_values(tmp_path, key, value, message):
  config = tiny_runs.tiny_config(**{key: value})
  if key == 'distributed.process_id':
    config.distributed.num_processes = 2
  expect_refusal(config, workdirs(tmp_path), ConfigError, message)


def test_unknown_data_set(tmp_path):
  # Found when the data loads, after the workdir was claimed: the claim is rolled back.
  config = tiny_runs.tiny_config(**{'dataset.name': 'imagenet21k'})
  expect_refusal(config, workdirs(tmp_path, with_run=False), DataError, "Unknown data set 'imagenet21k'")


@pytest.mark.slow
def test_batch_must_divide_the_devices_of_all_processes(tmp_path):
  config = tiny_runs.tiny_config(batch_size=66)
  with pytest.raises(ConfigError, match=re.escape('config.batch_size=66 does not divide over the 4 devices '
                                                  'of this run') + '.*e.g. --config.batch_size=64'):
    config_checks.check_devices(config, 4, 2)
  config_checks.check_devices(tiny_runs.tiny_config(batch_size=64), 4, 2)
  with pytest.raises(ConfigError, match='config.eval_batch_size=130 does not divide over the 4 devices'):
    config_checks.check_devices(tiny_runs.tiny_config(eval_batch_size=130), 4, 2)
  with pytest.raises(ConfigError, match='config.pretrain.batch_size=30 does not divide over the 4 devices'):
    config_checks.check_devices(tiny_runs.tiny_config(**{'pretrain.epochs': 1, 'pretrain.batch_size': 30,
                                                          'pretrain.dataset.name': 'digits'}), 4, 2)
  # End to end: run.py on two devices prints the message alone and exits with status 2.
  paths = workdirs(tmp_path, with_run=False)
  for path in paths:
    before = snapshot(path)
    p = tiny_runs.run_python(tiny_runs.cli_code(['--config=tests/tiny_config.py', '--config.batch_size=63',
                                                 f'--workdir={path}']), devices=2, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().startswith(
        'error: config.batch_size=63 does not divide over the 2 devices of this run'), p.stderr[-3000:]
    assert '--config.batch_size=62' in p.stderr and 'Traceback' not in p.stderr
    assert snapshot(path) == before


def _fake_variables(arch, width, num_classes=5, lora_rank=0):
  """A hand-made {'params', 'batch_stats'} tree of zeros shaped like `arch` (no initialisation run)."""
  config = tiny_runs.tiny_config(**{'model.arch': arch, 'model.width': width, 'model.lora_rank': lora_rank})
  model = models.create_model(config.model, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32)))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_pretrained_checkpoint_of_the_wrong_architecture(tmp_path, monkeypatch):
  target = _fake_variables('resnet18', 8, lora_rank=4)
  right = _fake_variables('resnet18', 8, num_classes=10)  # another head is fine: it is not transplanted
  variables, report = pretrain.transplant(right, target)
  assert report['unused'] == ['params/head/bias', 'params/head/kernel']
  with pytest.raises(CheckpointError, match=re.escape('shape mismatches [') + '.*' + re.escape(
      "'conv1/kernel: (3, 3, 3, 16) vs (3, 3, 3, 8)'")):
    pretrain.transplant(_fake_variables('resnet18', 16), target)
  with pytest.raises(CheckpointError, match=r'does not fit the configured model \(params\): missing \[\], '
                                            r'shape mismatches \[.*layer1_0/conv1/kernel: \(1, 1, 8, 8\) vs '
                                            r'\(3, 3, 8, 8\)'):
    pretrain.transplant(_fake_variables('resnet50', 8), target)
  # End to end: the run stops where the FE is transplanted and leaves the workdir as it was.
  wrong = _fake_variables('resnet50', 8)
  config = tiny_runs.tiny_config(pretrained=str(tmp_path / 'fe'))
  meta = {'mean': config.model.mean, 'std': config.model.std}
  monkeypatch.setattr(pretrain, 'load_pretrained', lambda *args, **kwargs: (wrong, meta))
  expect_refusal(config, [str(tmp_path / 'new' / 'run')], CheckpointError,
                 'The pre-trained FE does not fit the configured model')


def test_pretrain_batch_larger_than_its_data(tmp_path):
  config = tiny_runs.tiny_config(**{'pretrain.epochs': 1, 'pretrain.dataset.name': 'digits',
                                    'pretrain.batch_size': 4096})
  expect_refusal(config, [str(tmp_path / 'new' / 'run')], ConfigError,
                 'config.pretrain.batch_size=4096 exceeds the pre-training data (')


def test_run_py_prints_an_autoattack_input_error_alone(tmp_path):
  # autoattack/ has its own error type (it imports nothing of the package); run.py treats it as bad input.
  message = 'eps must lie in (0, 1] (images are in [0, 1]), got 2.0; e.g. 8/255.'
  hook = ('from autolora_jax import train\n'
          'from autolora_jax.autoattack.errors import AutoAttackInputError\n'
          'def fail(*args, **kwargs):\n'
          f'  raise AutoAttackInputError({message!r})\n'
          'train.train_and_evaluate = fail')
  argv = ['--config=tests/tiny_config.py', f'--workdir={tmp_path}']
  p = tiny_runs.run_python(tiny_runs.cli_code(argv, hook))
  assert p.returncode == 2, p.stderr[-3000:]
  assert p.stderr.strip().endswith(f'error: {message}') and 'Traceback' not in p.stderr, p.stderr[-3000:]


def test_workdir_holding_a_run_of_another_config(tmp_path):
  base = tiny_runs.tiny_config()
  old = make_old_run(tmp_path / 'old', base)
  config = tiny_runs.tiny_config(**{'model.width': 16, 'seed': 3})
  expect_refusal(config, [old], WorkdirError,
                 f'The workdir {old} holds a run of a different config (model.width: 8 -> 16; seed: 0 -> 3). '
                 'Resuming it with this config would mix two runs. Choose another --workdir, or pass '
                 '--overwrite to move the old run')
  # Run files without a config.json: the run's config is unknown, so it is refused too.
  bare = str(tmp_path / 'bare')
  os.makedirs(bare)
  with open(os.path.join(bare, 'metrics.jsonl'), 'w') as f:
    f.write('{}\n')
  expect_refusal(base, [bare], WorkdirError, 'it holds metrics.jsonl but no config.json')
  # --overwrite with input that fails later at start-up: the old run is moved back.
  bad_data = tiny_runs.tiny_config(**{'dataset.name': 'nothing'})
  expect_refusal(bad_data, [old], DataError, "Unknown data set 'nothing'", overwrite=True)


def test_overwrite_moves_the_old_run_aside(tmp_path):
  old = make_old_run(tmp_path / 'old', tiny_runs.tiny_config())
  before = snapshot(old)
  config = tiny_runs.tiny_config(**{'model.width': 16})
  claimed = workdir.claim(old, config, overwrite=True)
  replaced = os.listdir(os.path.join(old, 'replaced'))
  assert len(replaced) == 1
  assert snapshot(os.path.join(old, 'replaced', replaced[0])) == before  # nothing deleted
  assert sorted(os.listdir(old)) == ['config.json', 'replaced']
  with open(os.path.join(old, 'config.json')) as f:
    assert json.load(f)['model']['width'] == 16
  claimed.rollback()
  assert snapshot(old) == before


def test_resuming_ignores_keys_that_do_not_change_the_run():
  a = workdir.config_dict(tiny_runs.tiny_config())
  b = workdir.config_dict(tiny_runs.tiny_config(progress=True, tensorboard=True,
                                                **{'distributed.num_processes': 4}))
  assert workdir.config_differences(a, b) == []
  c = workdir.config_dict(tiny_runs.tiny_config(**{'attack.eps': 4 / 255}))
  assert workdir.config_differences(a, c) == [f'attack.eps: {8 / 255!r} -> {4 / 255!r}']
  # A run from before config.host and config.model.precision existed resumes, unless precision changes.
  old = workdir.config_dict(tiny_runs.tiny_config())
  del old['host'], old['model']['precision']
  old = compat.upgrade_config(old)  # as the workdir reads it
  assert workdir.config_differences(old, a) == []
  d = workdir.config_dict(tiny_runs.tiny_config(**{'model.precision': 'highest'}))
  assert workdir.config_differences(old, d) == ["model.precision: 'default' -> 'highest'"]


def test_workdir_that_cannot_be_written(tmp_path):
  config = tiny_runs.tiny_config()
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  expect_refusal(config, [str(blocker / 'run')], WorkdirError,
                 f'The workdir {blocker / "run"} cannot be written (Not a directory)')
  assert blocker.read_text() == 'not a folder'
  expect_refusal(config, [str(blocker)], WorkdirError, f'The workdir {blocker} is a file, not a folder')
  expect_refusal(config, [''], WorkdirError, 'No workdir given: pass --workdir=DIR')
  if os.geteuid() != 0:  # permissions do not bind root
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o555)
    expect_refusal(config, [str(locked)], WorkdirError, f'The workdir {locked} cannot be written')


def test_runs_made_before_the_twins_section_existed_still_match():
  """A config.json without config.twins (older runs) matches the same config of another method today; for a
  TWINS run, or when the old run has the section, its keys count as for any other section."""
  new = workdir.config_dict(tiny_runs.tiny_config())
  old = {k: v for k, v in new.items() if k != 'twins'}
  assert workdir.config_differences(old, new) == []
  twins = workdir.config_dict(tiny_runs.tiny_config(method='twins'))
  assert 'twins.loss: \'<absent>\' -> \'at\'' in workdir.config_differences(
      {k: v for k, v in twins.items() if k != 'twins'}, twins)
  changed = workdir.config_dict(tiny_runs.tiny_config(**{'twins.lam': 0.1}))
  assert workdir.config_differences(new, changed) == [f'twins.lam: {new["twins"]["lam"]!r} -> 0.1']
