"""python -m autolora_jax.compare: the comparison over methods and seeds, skipping and resuming runs, the
sensitivity sweep, the summaries, and the clear errors.

The end-to-end tests drive the command in subprocesses (as a user would; JAX's persistent compilation
cache, shared with the other tests, keeps them from recompiling) on tests/compare_tiny_config.py: one
epoch per method, three digit classes, AutoAttack (fast) on 16 test points.
"""

import json
import os

import numpy as np
import pytest

import compare_tiny_config
import tiny_runs
from autolora_jax import compare, preemption, reporting
from autolora_jax import workdir as workdirs
from autolora_jax.errors import ConfigError, WorkdirError

CONFIG = ['--config=tests/compare_tiny_config.py']
METRICS = ('clean', 'pgd10', 'autoattack')

# Test code only: SIGTERM during train step `step` (0-based) of the second run's first epoch, so that the
# first run finishes and the second one stops half-way.
SIGTERM_IN_SECOND_RUN = '''
import os, signal
from autolora_jax import loop
_original, _calls = loop.train_epoch, []
def _train_epoch(*args, on_step=None, **kwargs):
  _calls.append(kwargs['epoch'])
  def hook(state, s):
    if len(_calls) == 2 and s == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return on_step(state, s) if on_step is not None else False
  return _original(*args, on_step=hook, **kwargs)
loop.train_epoch = _train_epoch
'''


def _cli(argv, hook=''):
  code = ('import runpy, sys\n' + hook + f'\nsys.argv = {["compare"] + list(argv)!r}\n'
          'runpy.run_module("autolora_jax.compare", run_name="__main__", alter_sys=True)\n')
  cache = tiny_runs.cache_env()
  return tiny_runs.run_python(code, devices=1, timeout=900, **cache)


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def _comparable(results):
  """results.json without its wall times."""
  out = {k: v for k, v in results.items() if k != 'wall_seconds'}
  if 'autoattack' in out:
    out['autoattack'] = {k: v for k, v in out['autoattack'].items() if k != 'seconds'}
  return out


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
  """Two methods x two seeds through the command: (DIR, the process)."""
  workdir = str(tmp_path_factory.mktemp('compare'))
  p = _cli(CONFIG + ['--methods=autolora,vanilla_rft', '--seeds=0,1', f'--workdir={workdir}'])
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, p


@pytest.mark.slow
def test_comparison_outputs_match_the_runs(compared):
  workdir, p = compared
  with open(os.path.join(workdir, 'comparison.json')) as f:
    summary = json.load(f)
  assert list(summary['methods']) == ['autolora', 'vanilla_rft'] and summary['seeds'] == [0, 1]
  assert summary['dataset'] == 'digits' and summary['config_file'] == 'tests/compare_tiny_config.py'
  assert summary['eps'] == pytest.approx(8 / 255) and 'ddof=1' in summary['std']
  for method in ('autolora', 'vanilla_rft'):
    runs = [_results(os.path.join(workdir, method, f'seed{s}')) for s in (0, 1)]
    assert all(r['method'] == method for r in runs)
    entry = summary['methods'][method]
    assert entry['n'] == 2 and entry['seeds'] == [0, 1]
    for name in ('best', 'final'):
      for k in METRICS:
        values = np.array([r[name]['test'][k] for r in runs])
        assert entry[name][k]['mean'] == pytest.approx(values.mean(), abs=1e-12)
        assert entry[name][k]['std'] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert [entry['runs'][str(s)][name][k] for s in (0, 1)] == list(values)
    walls = [r['wall_seconds'] for r in runs]
    assert entry['wall_seconds']['mean'] == pytest.approx(np.mean(walls))
  md = open(os.path.join(workdir, 'comparison.md')).read()
  assert '| method | n seeds | best: SA / PGD-10 / AA | final: SA / PGD-10 / AA | wall time per run |' in md
  assert 'ddof=1' in md and 'python -m autolora_jax.compare --config=tests/compare_tiny_config.py' in md
  assert 'Table 2' not in md  # the digits are not a paper data set
  assert os.path.getsize(os.path.join(workdir, 'comparison.png')) > 5000
  assert '[1/4] autolora/seed0: started' in p.stderr and '[4/4] vanilla_rft/seed1: finished' in p.stderr


def test_second_call_runs_nothing_and_gives_the_same_summary(compared):
  workdir, _ = compared
  mtimes = {m: os.path.getmtime(os.path.join(workdir, m, 'seed0', 'results.json'))
            for m in ('autolora', 'vanilla_rft')}
  with open(os.path.join(workdir, 'comparison.json')) as f:
    before = json.load(f)
  calls = []
  out = compare.compare(compare_tiny_config.get_config(), workdir, method_names=['autolora', 'vanilla_rft'],
                        seeds=[0, 1], config_file=before['config_file'], command=before['command'],
                        runner=lambda *a, **k: calls.append(a))
  assert calls == []
  with open(os.path.join(workdir, 'comparison.json')) as f:
    again = json.load(f)
  assert again == before == json.loads(json.dumps(out['comparison']))
  for m, t in mtimes.items():
    assert os.path.getmtime(os.path.join(workdir, m, 'seed0', 'results.json')) == t


@pytest.mark.slow
def test_a_stopped_comparison_resumes_to_the_uninterrupted_result(compared, tmp_path):
  reference, _ = compared
  workdir = str(tmp_path / 'stopped')
  argv = CONFIG + ['--methods=autolora,vanilla_rft', '--seeds=0', f'--workdir={workdir}']
  p = _cli(argv, hook=SIGTERM_IN_SECOND_RUN)
  assert p.returncode == preemption.EXIT_CODE, p.stderr[-3000:]
  assert 'Stopped by SIGTERM after step 2' in p.stderr and 'Traceback' not in p.stderr
  assert 'Running the same compare command again resumes it' in p.stderr
  assert os.path.exists(os.path.join(workdir, 'autolora', 'seed0', 'results.json'))
  assert not os.path.exists(os.path.join(workdir, 'vanilla_rft', 'seed0', 'results.json'))
  assert not os.path.exists(os.path.join(workdir, 'comparison.json'))

  p = _cli(argv)  # the same command again
  assert p.returncode == 0, p.stderr[-3000:]
  assert '[1/2] autolora/seed0: skipped' in p.stderr and '[2/2] vanilla_rft/seed0: resuming' in p.stderr
  for method in ('autolora', 'vanilla_rft'):  # the same runs as in the uninterrupted comparison
    ours, theirs = (os.path.join(w, method, 'seed0') for w in (workdir, reference))
    assert tiny_runs.read_metrics(ours) == tiny_runs.read_metrics(theirs)
    assert _comparable(_results(ours)) == _comparable(_results(theirs))
  with open(os.path.join(workdir, 'comparison.json')) as f:
    summary = json.load(f)
  assert {m: e['seeds'] for m, e in summary['methods'].items()} == {'autolora': [0], 'vanilla_rft': [0]}
  assert summary['methods']['vanilla_rft']['best']['pgd10']['std'] == 0.0


@pytest.mark.slow
def test_sweep_writes_the_grid_beside_autolora(compared):
  workdir, _ = compared
  p = _cli(CONFIG + ['--sweep', '--sweep_lr=0.003,0.03', '--sweep_l2=6', '--sweep_lr0=0.01,0.03', '--seeds=0',
                     f'--workdir={workdir}'])
  assert p.returncode == 0, p.stderr[-3000:]
  assert '[3/4] autolora/seed0: skipped' in p.stderr  # the comparison's run (lr0 0.01), reused
  assert '[4/4] autolora_lr0_0.03/seed0: started' in p.stderr
  with open(os.path.join(workdir, 'sensitivity.json')) as f:
    sweep = json.load(f)
  assert [(g['lr'], g['l2']) for g in sweep['grid']] == [(0.003, 6.0), (0.03, 6.0)]
  for g in sweep['grid']:
    results = _results(os.path.join(workdir, 'sweep', g['label'], 'seed0'))
    assert results['method'] == 'vanilla_rft'
    assert g['best']['pgd10']['mean'] == results['best']['test']['pgd10']
    with open(os.path.join(workdir, 'sweep', g['label'], 'seed0', 'config.json')) as f:
      assert json.load(f)['fixed']['lr'] == g['lr']
  autolora = _results(os.path.join(workdir, 'autolora', 'seed0'))
  assert sweep['autolora']['best']['autoattack']['mean'] == autolora['best']['test']['autoattack']
  assert os.path.getsize(os.path.join(workdir, 'sensitivity.png')) > 5000
  md = open(os.path.join(workdir, 'sensitivity.md')).read()
  assert '| lr \\ l2 | 6 |' in md and '| 0.003 |' in md and 'AutoLoRa' in md
  assert [r['lr0'] for r in sweep['autolora_lr0']] == [0.01, 0.03]
  assert sweep['autolora_lr0'][0]['best']['pgd10']['mean'] == autolora['best']['test']['pgd10']
  with open(os.path.join(workdir, 'sweep', 'autolora_lr0_0.03', 'seed0', 'config.json')) as f:
    assert json.load(f)['auto_lr']['lr0'] == 0.03
  assert '| lr0 | 0.01 | 0.03 |' in md


def _results_of(best, final=None, wall=None):
  out = {'best': {'epoch': 1, 'test': dict(best)}, 'final': {'epoch': 2, 'test': dict(final or best)}}
  if wall is not None:
    out['wall_seconds'] = wall
  return out


def test_summarize_on_hand_made_numbers():
  results = {
      'autolora': {0: _results_of({'clean': 0.5, 'pgd10': 0.2, 'autoattack': 0.1}, wall=10.0),
                   1: _results_of({'clean': 0.7, 'pgd10': 0.3, 'autoattack': 0.2}, wall=20.0),
                   2: _results_of({'clean': 0.6, 'pgd10': 0.4, 'autoattack': 0.3}, wall=30.0)},
      'pgd_at': {5: _results_of({'clean': 0.4, 'pgd10': 0.25}, {'clean': 0.45, 'pgd10': 0.2})},
  }
  s = compare.summarize(results)['methods']
  a = s['autolora']
  assert a['n'] == 3 and a['seeds'] == [0, 1, 2]
  assert a['best']['clean']['mean'] == pytest.approx(0.6) and a['best']['clean']['std'] == pytest.approx(0.1)
  assert a['best']['pgd10']['mean'] == pytest.approx(0.3) and a['best']['pgd10']['std'] == pytest.approx(0.1)
  assert a['final']['autoattack']['mean'] == pytest.approx(0.2)
  assert a['wall_seconds'] == {'mean': 20.0, 'std': 10.0, 'n': 3}
  assert a['runs']['1']['best'] == {'clean': 0.7, 'pgd10': 0.3, 'autoattack': 0.2}
  p = s['pgd_at']  # one seed: std 0; no AutoAttack: left out; no wall time
  assert p['best']['clean'] == {'mean': 0.4, 'std': 0.0, 'n': 1} and 'autoattack' not in p['best']
  assert p['final']['clean']['mean'] == 0.45 and p['wall_seconds']['mean'] is None
  md = compare.markdown({'dataset': 'cifar10', 'arch': 'resnet18', **compare.summarize(results)})
  assert '| AutoLoRa (`autolora`) | 3 | 60.00 ± 10.00 / 30.00 ± 10.00 / 20.00 ± 10.00 |' in md
  assert '| PGD-AT (`pgd_at`) | 1 | 40.00 ± 0.00 / 25.00 ± 0.00 / – |' in md
  assert 'ResNet-50' in md and '86.93 / 57.16 / 52.00' in md
  assert '| TWINS | – | 86.50 / 56.77 / 51.73 |' in md  # a paper method we did not run


def _fake_runner(calls):
  def runner(c, workdir):  # writes what a finished run writes, without training
    calls.append((c.method, c.seed, c.pretrain.cache_dir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdirs.CONFIG_FILE), 'w') as f:
      f.write(c.to_json_best_effort())
    lr = c.auto_lr.lr0 if c.method == 'autolora' else c.fixed.lr  # the swept rate, as the robust accuracy
    r = _results_of({'clean': 0.5 + c.seed / 10, 'pgd10': lr, 'autoattack': 0.1}, wall=1.0)
    reporting.write_results(workdir, r)
    return r
  return runner


def test_finished_runs_are_skipped_and_other_configs_refused(tmp_path):
  config = compare_tiny_config.get_config()
  calls = []
  fake_runner = _fake_runner(calls)
  out = compare.run_all(config, ['pgd_at'], [0, 1], str(tmp_path), runner=fake_runner)
  assert calls == [('pgd_at', s, str(tmp_path / 'pretrain')) for s in (0, 1)]
  assert config.method == 'autolora' and config.pretrain.cache_dir == ''  # the caller's config unchanged
  assert out['pgd_at'][1]['best']['test']['clean'] == 0.6
  compare.run_all(config, ['pgd_at'], [0, 1], str(tmp_path), runner=fake_runner)
  assert len(calls) == 2  # both finished: skipped
  os.remove(os.path.join(tmp_path, 'pgd_at', 'seed1', 'results.json'))
  compare.run_all(config, ['pgd_at'], [0, 1], str(tmp_path), runner=fake_runner)
  assert len(calls) == 3  # the unfinished one is run (resumed) again
  config.fixed.lr = 0.5
  with pytest.raises(WorkdirError, match=r'different config \(fixed.lr: 0.01 -> 0.5\)'):
    compare.run_all(config, ['pgd_at'], [0], str(tmp_path), runner=fake_runner)
  with pytest.raises(ConfigError, match="Unknown method 'twinz'"):
    compare.run_all(config, ['autolora', 'twinz'], [0], str(tmp_path), runner=fake_runner)
  with pytest.raises(ConfigError, match='non-negative'):
    compare.parse_seeds('0,-1')
  with pytest.raises(ConfigError, match='share the same folder sweep/lr0.001_l20'):
    compare.plan_sweep(config, [0.001, 0.0010000001], [0], [0], str(tmp_path))
  assert len(calls) == 3


def test_sweep_and_methods_together_share_the_autolora_runs(tmp_path):
  calls = []
  out = compare.compare(compare_tiny_config.get_config(), str(tmp_path), method_names=['autolora', 'pgd_at'],
                        seeds=[0], sweep=True, sweep_lrs=[0.001, 0.03], sweep_l2s=[0],
                        runner=_fake_runner(calls))
  # AutoLoRa over SWEEP_LR0S too: its 0.01 is the comparison's run, the other three run in sweep/.
  assert [c[:2] for c in calls] == [('autolora', 0), ('pgd_at', 0), ('vanilla_rft', 0), ('vanilla_rft', 0)] + [
      ('autolora', 0)] * 3
  assert sorted(os.listdir(tmp_path / 'sweep')) == ['autolora_lr0_0.003', 'autolora_lr0_0.03', 'autolora_lr0_0.1',
                                                     'lr0.001_l20', 'lr0.03_l20']
  grid = out['sensitivity']['grid']
  assert [(g['lr'], g['l2'], g['best']['pgd10']['mean']) for g in grid] == [(0.001, 0.0, 0.001),
                                                                           (0.03, 0.0, 0.03)]
  assert out['sensitivity']['autolora']['n'] == 1
  assert list(out['comparison']['methods']) == ['autolora', 'pgd_at']
  for name in compare.COMPARISON_FILES + compare.SENSITIVITY_FILES:
    assert os.path.getsize(tmp_path / name) > 0, name


@pytest.mark.slow
def test_unknown_method_and_missing_config_file_are_clear_errors(tmp_path):
  workdir = tmp_path / 'never'
  p = _cli(CONFIG + ['--methods=autolora,twinz', f'--workdir={workdir}'])
  assert p.returncode == 2, p.stderr[-3000:]
  assert "error: Unknown method 'twinz' in --methods: choose from autolora, vanilla_rft, pgd_at" in p.stderr
  assert 'Traceback' not in p.stderr and not workdir.exists()
  p = _cli(['--config=configs/no_such_file.py', '--methods=autolora', f'--workdir={workdir}'])
  assert p.returncode == 2, p.stderr[-3000:]
  assert 'error:' in p.stderr and 'no_such_file.py' in p.stderr and 'Traceback' not in p.stderr
  assert not workdir.exists()


def test_the_sweep_runs_autolora_over_lr0_beside_the_grid(tmp_path):
  """Two lr0 values (the config's 0.01: the comparison's run) beside vanilla RFT's grid: both methods in the
  JSON, the markdown and the plot's series; the comparison's compute column counts the grid for vanilla RFT."""
  calls = []
  out = compare.compare(compare_tiny_config.get_config(), str(tmp_path), method_names=['autolora', 'vanilla_rft'],
                        seeds=[0], sweep=True, sweep_lrs=[0.003, 0.01, 0.03], sweep_l2s=[6], sweep_lr0s=[0.01, 0.1],
                        runner=_fake_runner(calls))
  assert [c[:2] for c in calls] == [('autolora', 0), ('vanilla_rft', 0)] + [('vanilla_rft', 0)] * 3 + [('autolora', 0)]
  sweep = out['sensitivity']
  assert [(r['lr0'], r['label'], r['best']['pgd10']['mean']) for r in sweep['autolora_lr0']] == [
      (0.01, 'autolora_lr0_0.01', 0.01), (0.1, 'autolora_lr0_0.1', 0.1)]
  with open(tmp_path / 'sensitivity.json') as f:
    assert json.load(f)['autolora_lr0'] == json.loads(json.dumps(sweep['autolora_lr0']))
  md = (tmp_path / 'sensitivity.md').read_text()
  assert '| lr0 | 0.01 | 0.1 |' in md and '| PGD-10 | 1.00 ± 0.00 | 10.00 ± 0.00 |' in md
  assert 'Vanilla RFT over the grid: 0.30 to 3.00 (spread 2.70 points)' in md
  assert 'AutoLoRa over lr0: 1.00 to 10.00 (spread 9.00 points)' in md
  series = compare.sensitivity_series(sweep, 'pgd10')
  assert [(s['method'], s['lr'], s['mean']) for s in series] == [
      ('vanilla_rft', [0.003, 0.01, 0.03], pytest.approx([0.3, 1.0, 3.0])),
      ('autolora', [0.01, 0.1], pytest.approx([1.0, 10.0]))]
  assert os.path.getsize(tmp_path / 'sensitivity.png') > 5000
  # Compute: AutoLoRa one run; vanilla RFT its run and the grid's other two points (lr 0.01 is its own run).
  methods = out['comparison']['methods']
  assert methods['autolora']['budget']['runs']['mean'] == 1 and methods['autolora']['budget']['search_runs'] == 0
  assert methods['vanilla_rft']['budget']['runs']['mean'] == 3
  assert methods['vanilla_rft']['budget']['wall_seconds']['mean'] == 3.0
  md = (tmp_path / 'comparison.md').read_text()
  assert '| wall time per run | compute per seed |' in md
  assert '| 3 runs (2 of the grid), 3 s |' in md and '| 1 run, 1 s |' in md


def test_budget_counts_the_probe():
  results = {0: {**_results_of({'clean': 0.5}, wall=100.0), 'lr0_probe': {'seconds': 20.0}},
             1: {**_results_of({'clean': 0.5}, wall=120.0), 'lr0_probe': {'seconds': 30.0}}}
  b = compare.budget(results)
  assert b['runs']['mean'] == 1 and b['wall_seconds']['mean'] == 110.0 and b['probe_seconds']['mean'] == 25.0
  assert compare.format_budget(b) == '1 run incl. lr0 probe (25 s), 110 s'
