"""Preemption and numerical faults, end to end through run.py on the tiny digits config.

* SIGTERM in the middle of epoch 2: the run saves its position, exits with a resume message, and the same
  command then ends with the same parameters, metrics.jsonl lines (timings aside) and results as a run
  that was never interrupted (which also shows that two runs of one config give identical metrics).
* SIGTERM while the (asynchronous) checkpoint of epoch 1 is being written: the run waits for it, stops
  before epoch 2, and resumes from it to the uninterrupted result.
* A NaN loss at epoch 2, step 1: the run stops with the message, epoch 1's checkpoint stays the newest and
  restorable, and running again resumes from it to the uninterrupted result.
* The signal guard itself (SIGTERM, SIGINT, a second SIGINT), in this process.
"""

import json
import os
import signal

import numpy as np
import pytest

import tiny_runs
from autolora_jax import preemption

EPOCHS = 3
FLAGS = ['--config=tests/tiny_config.py', f'--config.auto_lr.max_epochs={EPOCHS}',
         '--config.dataset.classes=(5,6,7)']


@pytest.fixture(scope='module')
def compile_cache():
  return tiny_runs.cache_env()


def _cli(workdir, cache, hook=''):
  return tiny_runs.run_python(tiny_runs.cli_code(FLAGS + [f'--workdir={workdir}'], hook), devices=1,
                              timeout=900, **cache)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, compile_cache):
  """An uninterrupted run: (workdir, steps per epoch)."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  p = _cli(workdir, compile_cache)
  assert p.returncode == 0, p.stderr[-3000:]
  last = tiny_runs.checkpoint_steps(workdir)[-1]
  assert last % EPOCHS == 0
  return workdir, last // EPOCHS


def _assert_same_run(workdir, reference_dir, steps_per_epoch):
  assert tiny_runs.read_metrics(workdir) == tiny_runs.read_metrics(reference_dir)
  last = EPOCHS * steps_per_epoch
  assert tiny_runs.checkpoint_steps(workdir)[-1] == last == tiny_runs.checkpoint_steps(reference_dir)[-1]
  a, b = (tiny_runs.restore_tree(os.path.join(w, 'checkpoints', 'latest', str(last), 'state'))
          for w in (workdir, reference_dir))
  assert set(a) == set(b) and len(a) > 100
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  results = []
  for w in (workdir, reference_dir):
    with open(os.path.join(w, 'results.json')) as f:
      result = json.load(f)
      # The runs' wall times differ, and so does the command line (each names its own workdir).
      assert result.pop('command').endswith(f'--workdir={w}')
      result.pop('wall_seconds')
      if 'autoattack' in result:  # AutoAttack's wall times differ between runs; its outcomes must not
        result['autoattack'] = {k: v for k, v in result['autoattack'].items() if k != 'seconds'}
      results.append(result)
  assert results[0] == results[1]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, reference, compile_cache):
  reference_dir, spe = reference
  workdir = str(tmp_path / 'run')
  p = _cli(workdir, compile_cache, hook='tiny_runs.sigterm_at(2, 2)')  # signal during step 2 (0-based)
  assert p.returncode == preemption.EXIT_CODE, p.stderr[-3000:]
  assert f'Stopped by SIGTERM after step 3 of {spe} of epoch 2' in p.stderr
  assert f'To resume: python run.py {" ".join(FLAGS[:2])}' in p.stderr and f'--workdir={workdir}' in p.stderr
  assert 'Traceback' not in p.stderr
  # The checkpoint holds the position inside the epoch and the epoch's running sums.
  assert tiny_runs.checkpoint_steps(workdir)[-1] == spe + 3
  meta = tiny_runs.checkpoint_meta(workdir, 'latest', spe + 3)
  assert meta['epoch'] == 1 and not meta['done']
  assert meta['position']['epoch'] == 2 and meta['position']['step'] == 3
  assert meta['position']['carry']['steps'] == 3 and 'loss' in meta['position']['carry']['sums']
  assert [r['epoch'] for r in tiny_runs.read_metrics(workdir)] == [0, 1]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  p = _cli(workdir, compile_cache)  # the same command again
  assert p.returncode == 0, p.stderr[-3000:]
  _assert_same_run(workdir, reference_dir, spe)


@pytest.mark.slow
def test_sigterm_while_a_checkpoint_is_written_waits_for_it_then_resume_matches(tmp_path, reference,
                                                                                compile_cache):
  reference_dir, spe = reference
  workdir = str(tmp_path / 'run')
  p = _cli(workdir, compile_cache, hook='tiny_runs.sigterm_during_save(1)')
  assert p.returncode == preemption.EXIT_CODE, p.stderr[-3000:]
  assert 'SAVING_AT_SIGTERM True' in p.stderr  # the signal came while epoch 1's checkpoint was written
  assert 'Stopped by SIGTERM before epoch 2' in p.stderr and 'Traceback' not in p.stderr
  # The run waited for that save: epoch 1's checkpoint is complete and the newest.
  assert tiny_runs.checkpoint_steps(workdir) == [spe]
  assert tiny_runs.checkpoint_meta(workdir, 'latest', spe)['epoch'] == 1
  assert len(tiny_runs.restore_tree(os.path.join(workdir, 'checkpoints', 'latest', str(spe), 'state'))) > 100

  p = _cli(workdir, compile_cache)  # the same command again resumes after epoch 1
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'Damaged' not in p.stderr
  _assert_same_run(workdir, reference_dir, spe)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, reference, compile_cache):
  reference_dir, spe = reference
  workdir = str(tmp_path / 'run')
  p = _cli(workdir, compile_cache, hook='tiny_runs.nan_images_at(2, 1)')
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'error: Non-finite training metrics' in p.stderr and 'at epoch 2, step 1' in p.stderr
  assert 'the last good checkpoint is kept' in p.stderr and 'Traceback' not in p.stderr
  # Nothing of epoch 2 was saved: epoch 1's state is the newest, finite, and restorable.
  assert tiny_runs.checkpoint_steps(workdir) == [spe]
  assert tiny_runs.checkpoint_meta(workdir, 'latest', spe)['epoch'] == 1
  for which, step in (('latest', spe), ('best', tiny_runs.checkpoint_steps(workdir, 'best')[-1])):
    tree = tiny_runs.restore_tree(os.path.join(workdir, 'checkpoints', which, str(step), 'state'))
    assert all(np.all(np.isfinite(v)) for v in tree.values() if v.dtype.kind == 'f')
  assert [r['epoch'] for r in tiny_runs.read_metrics(workdir)] == [0, 1]

  p = _cli(workdir, compile_cache)  # running again resumes from epoch 1's checkpoint
  assert p.returncode == 0, p.stderr[-3000:]
  _assert_same_run(workdir, reference_dir, spe)


def test_guard_turns_signals_into_a_stop_request():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with preemption.Guard(multiprocess=False) as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(2) and guard.signal_name == 'SIGTERM'
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  with preemption.Guard(multiprocess=False) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.should_stop(1) and guard.signal_name == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):
        pass
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_position_ids_grow_with_progress():
  spe = 5
  ids = [preemption.position_id(e, s, spe) for e in (1, 2, 3) for s in range(1, spe + 2)]
  assert ids == sorted(set(ids))
