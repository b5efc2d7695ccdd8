"""config.auto_lr.lr0 = 'auto': the probe picks the candidate with the best validation robust accuracy, the run
goes on from its state (the run that lr0 = pick makes), a repeat and a run stopped in the middle of the probe
give the same result, and methods without the automatic schedule refuse it.

The runs are in-process on tests/tiny_runs.tiny_config: one epoch, no AutoAttack, two candidates of one whole
epoch each (the first one wins, so the resumed probe trains it again).
"""

import json
import os
import signal

import pytest

import tiny_runs
from autolora_jax import config_checks, loop, lr_probe, reporting, train
from autolora_jax.errors import ConfigError, Preempted

CANDIDATES = (0.1, 0.003)  # on the tiny config the larger rate wins after one epoch


def _config(lr0='auto'):
  config = tiny_runs.tiny_config(epochs=1)
  config.autoattack.enabled = False
  config.auto_lr.lr0 = lr0
  config.auto_lr.lr0_candidates = CANDIDATES
  return config


def _metrics(workdir):
  records = tiny_runs.read_metrics(workdir)
  for r in records:
    if 'lr0_probe' in r:
      r['lr0_probe'] = {k: v for k, v in r['lr0_probe'].items() if k != 'seconds'}
  return records


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    r = json.load(f)
  r.pop('wall_seconds')
  r.get('lr0_probe', {}).pop('seconds', None)
  return r


@pytest.fixture(scope='module')
def auto_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('auto'))
  train.train_and_evaluate(_config(), workdir)
  return workdir


def test_pick_takes_the_best_score_first_of_equals_never_a_diverged_one():
  scores = [{'lr': 0.003, 'val_pgd10': 0.2}, {'lr': 0.01, 'val_pgd10': 0.4}, {'lr': 0.03, 'val_pgd10': 0.4},
            {'lr': 0.1, 'val_pgd10': None}]
  assert lr_probe.pick(scores) == 0.01
  assert lr_probe.pick([{'lr': 0.1, 'val_pgd10': None}]) is None


def test_the_probe_picks_the_best_candidate_and_the_run_goes_on_from_its_state(auto_run):
  records = _metrics(auto_run)
  probe = records[0]['lr0_probe']
  assert probe['candidates'] == list(CANDIDATES) and probe['steps'] == probe['steps_per_epoch']
  scores = dict(zip(probe['candidates'], probe['val_pgd10']))
  assert probe['pick'] == max(scores, key=scores.get) and scores[0.1] > scores[0.003]
  assert records[0]['lr'] == records[1]['lr'] == probe['pick']
  # The pick's probe is the run's first epoch: its validation is the probe's score.
  assert records[1]['val_pgd10'] == scores[probe['pick']]
  results = _results(auto_run)
  assert results['lr0_probe'] == probe
  marks = reporting.decision_marks(tiny_runs.read_metrics(auto_run))
  assert [m['kind'] for m in marks] == ['lr0_pick', 'stop'] and 'lr0 0.1 picked' in marks[0]['label']


def test_the_run_is_the_one_lr0_pick_makes(auto_run, tmp_path):
  train.train_and_evaluate(_config(lr0=0.1), str(tmp_path))
  ours, fixed = _metrics(auto_run), _metrics(str(tmp_path))
  assert ours[1:] == fixed[1:]
  assert {k: v for k, v in ours[0].items() if k != 'lr0_probe'} == fixed[0]
  assert {k: v for k, v in _results(auto_run).items() if k != 'lr0_probe'} == _results(str(tmp_path))


def test_a_stop_in_the_probe_resumes_to_the_same_run(auto_run, tmp_path, monkeypatch):
  original = loop.train_epoch

  def train_epoch(*args, on_step=None, **kwargs):  # SIGTERM in the second candidate's second step
    def hook(state, step):
      if kwargs.get('desc') == 'lr0 probe: lr 0.003' and step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return on_step(state, step) if on_step is not None else False
    return original(*args, on_step=hook, **kwargs)

  monkeypatch.setattr(loop, 'train_epoch', train_epoch)
  workdir = str(tmp_path)
  with pytest.raises(Preempted, match='in the lr0 probe'):
    train.train_and_evaluate(_config(), workdir)
  assert [s['lr'] for s in lr_probe.read(workdir)['scores']] == [0.1]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  monkeypatch.setattr(loop, 'train_epoch', original)
  train.train_and_evaluate(_config(), workdir)  # the same run again: 0.1 kept, 0.003 scored, 0.1 trained again
  assert lr_probe.read(workdir)['rerun_seconds'] > 0
  assert _metrics(workdir) == _metrics(auto_run)
  assert _results(workdir) == _results(auto_run)


@pytest.mark.parametrize('method', ['vanilla_rft', 'pgd_at', 'twins', 'lora_at'])
def test_methods_without_the_automatic_schedule_refuse_it(method):
  config = _config()
  config.method = method
  with pytest.raises(ConfigError, match=rf"lr0='auto' .* \(config.method={method}\) has none"):
    config_checks.validate(config)


def test_bad_values_are_clear_errors():
  config = _config(lr0='fast')
  with pytest.raises(ConfigError, match="a learning rate in \\(0, 10\\] or 'auto'"):
    config_checks.validate(config)
  config = _config()
  config.auto_lr.lr0_candidates = (0.01, 0.01)
  with pytest.raises(ConfigError, match='lr0_candidates must be distinct'):
    config_checks.validate(config)


def test_the_command_line_spelling(tmp_path):
  workdir = tmp_path / 'never'
  p = tiny_runs.run_python(tiny_runs.cli_code(['--config=tests/tiny_config.py', '--config.auto_lr.lr0=auto',
                                               '--config.method=vanilla_rft', f'--workdir={workdir}']))
  assert p.returncode == 2, p.stderr[-3000:]
  assert "config.auto_lr.lr0='auto' lets a short probe pick" in p.stderr and 'Traceback' not in p.stderr
  assert not workdir.exists()
