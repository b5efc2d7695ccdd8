"""Files of other format versions (autolora_jax.compat): what version 1 wrote is read as the current version
writes it, a newer version's files are refused with what to do, and every workdir and checkpoint records its
version."""

import json
import os

import numpy as np
import pytest

import tiny_runs
from autolora_jax import api, checkpoints, compat, policy, workdir
from autolora_jax.errors import CheckpointError, WorkdirError


def _write_config(path, data):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(data, f)


def test_workdir_records_its_version_and_a_run_resumes_with_it(tmp_path):
  config = tiny_runs.tiny_config()
  path = str(tmp_path / 'run')
  workdir.claim(path, config, overwrite=False)
  with open(os.path.join(path, 'config.json')) as f:
    saved = json.load(f)
  assert saved['format_version'] == compat.FORMAT_VERSION
  assert {k: v for k, v in saved.items() if k != 'format_version'} == workdir.config_dict(config)
  workdir.claim(path, config, overwrite=False)  # the same config resumes: the version is no config key
  assert 'format_version' not in api.read_config(path)


def test_version_1_config_gets_the_keys_added_since_at_their_old_values(tmp_path):
  new = workdir.config_dict(tiny_runs.tiny_config())
  old = json.loads(json.dumps(new))  # a run that began before these keys existed
  del old['attack']['norm']
  for key in ('norm', 'eps', 'attacks'):
    del old['autoattack'][key]
  upgraded = compat.upgrade_config(old)
  assert upgraded['attack']['norm'] == 'linf' and upgraded['autoattack']['eps'] == 0.0
  assert workdir.config_differences(upgraded, new) == []
  l2 = workdir.config_dict(tiny_runs.tiny_config(**{'attack.norm': 'l2'}))
  assert workdir.config_differences(upgraded, l2) == ["attack.norm: 'linf' -> 'l2'"]
  _write_config(str(tmp_path / 'old'), old)  # resumes, and the file is left as it was written
  workdir.claim(str(tmp_path / 'old'), tiny_runs.tiny_config(), overwrite=False)
  with open(tmp_path / 'old' / 'config.json') as f:
    assert json.load(f) == old
  assert api.read_config(str(tmp_path / 'old')).attack.norm == 'linf'
  with pytest.raises(WorkdirError, match=r"different config \(attack.norm: 'linf' -> 'l2'\)"):
    workdir.claim(str(tmp_path / 'old'), tiny_runs.tiny_config(**{'attack.norm': 'l2'}), overwrite=False)


def test_version_2_config_gets_the_lr0_probe_keys_at_their_old_values():
  new = workdir.config_dict(tiny_runs.tiny_config())
  old = json.loads(json.dumps(new))
  del old['auto_lr']['lr0_candidates'], old['auto_lr']['probe_steps']
  upgraded = compat.upgrade_config({**old, 'format_version': 2})
  assert workdir.config_differences(upgraded, new) == []
  assert compat.upgrade_config(old) == upgraded  # version 1 passes through every step
  changed = workdir.config_dict(tiny_runs.tiny_config(**{'auto_lr.probe_steps': 5}))
  assert workdir.config_differences(upgraded, changed) == ['auto_lr.probe_steps: 0 -> 5']


def test_version_3_config_gets_no_validation_attacks():
  new = workdir.config_dict(tiny_runs.tiny_config())
  old = json.loads(json.dumps(new))
  del old['eval']['val_attacks']
  upgraded = compat.upgrade_config({**old, 'format_version': 3})
  assert upgraded['eval']['val_attacks'] == [] and workdir.config_differences(upgraded, new) == []
  with_attacks = workdir.config_dict(tiny_runs.tiny_config(**{'eval.val_attacks': ('apgd-ce',)}))
  assert workdir.config_differences(upgraded, with_attacks) == ["eval.val_attacks: [] -> ['apgd-ce']"]


@pytest.mark.parametrize('version,key,default,other', [(4, 'attention_impl', 'auto', 'einsum'),
                                                        (5, 'remat', 'none', 'forwards')])
def test_config_of_version_4_or_5_gets_the_model_default_and_resumes(version, key, default, other):
  new = workdir.config_dict(tiny_runs.tiny_config())
  old = json.loads(json.dumps(new))
  del old['model'][key]
  upgraded = compat.upgrade_config({**old, 'format_version': version})
  assert upgraded['model'][key] == default and workdir.config_differences(upgraded, new) == []
  changed = workdir.config_dict(tiny_runs.tiny_config(**{f'model.{key}': other}))
  assert workdir.config_differences(upgraded, changed) == [f'model.{key}: {default!r} -> {other!r}']


def test_version_1_policy_state_resumes_the_same_run():
  """A checkpoint whose automatic learning rate's state is nested under policy['auto'] (version 1)."""
  old = {'epoch': 5, 'done': False,
         'policy': {'lr': 0.005, 'l1': 0.2, 'l2': 4.8, 'best': 0.5, 'best_epoch': 2, 'best_nat_acc': 0.8,
                    'auto': {'lr': 0.005, 'history': [0.3, 0.5, 0.4, 0.45, 0.44], 'best': 0.5, 'best_epoch': 2,
                             'window_index': 2, 'best_at_checkpoint': 0.5, 'halved_at_checkpoint': True}}}
  meta = compat.upgrade_checkpoint_meta(old)
  assert meta['format_version'] == compat.FORMAT_VERSION and meta['epoch'] == 5
  state = policy.from_dict(meta['policy'])
  assert state == policy.PolicyState(lr=0.005, l1=0.2, l2=4.8, history=(0.3, 0.5, 0.4, 0.45, 0.44), best=0.5,
                                     best_epoch=2, best_nat_acc=0.8, window_index=2, best_at_window=0.5,
                                     halved_at_window=True)
  sched = policy.auto_lr()
  fresh = sched.init()
  for epoch, r in enumerate([0.3, 0.5, 0.4, 0.45, 0.44], start=1):
    fresh, _ = sched.update(fresh, epoch, r)
  assert fresh._replace(l1=0.2, l2=4.8, best_nat_acc=0.8) == state  # the curve that led there
  assert 'auto' in old['policy']  # the caller's data is not changed


def test_checkpoints_record_their_version_and_newer_ones_are_refused(tmp_path):
  ckpts = checkpoints.Checkpoints(str(tmp_path))
  tree = {'w': np.ones((2, 3), np.float32)}
  ckpts.save('latest', 1, tree, {'epoch': 1, 'done': False})
  ckpts.wait()
  with open(tmp_path / 'checkpoints' / 'latest' / '1' / 'meta' / 'metadata') as f:
    assert json.load(f)['format_version'] == compat.FORMAT_VERSION
  assert ckpts.restore_meta('latest')['format_version'] == compat.FORMAT_VERSION
  ckpts.close()
  newer = rf'newer autolora-jax \(format version {compat.FORMAT_VERSION + 1}; this one reads up to {compat.FORMAT_VERSION}\)'
  with pytest.raises(CheckpointError, match=newer):
    compat.upgrade_checkpoint_meta({'epoch': 1, 'format_version': compat.FORMAT_VERSION + 1})


def test_config_of_a_newer_version_is_refused(tmp_path):
  path = str(tmp_path / 'run')
  _write_config(path, {**workdir.config_dict(tiny_runs.tiny_config()), 'format_version': compat.FORMAT_VERSION + 1})
  message = (r'config.json was written by a newer autolora-jax '
             rf'\(format version {compat.FORMAT_VERSION + 1}; this one reads up to {compat.FORMAT_VERSION}\)')
  with pytest.raises(WorkdirError, match=message):
    workdir.claim(path, tiny_runs.tiny_config(), overwrite=True)  # nothing is moved aside either
  assert os.listdir(path) == ['config.json']
  with pytest.raises(WorkdirError, match=message):
    api.read_config(path)
