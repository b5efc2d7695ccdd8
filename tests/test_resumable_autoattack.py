"""Resumable AutoAttack: `autoattack.run(resume=, on_progress=)` and the test evaluation's saved progress.

* unit: `autoattack.run` on the digits MLP, stopped by a raising `on_progress` at every position (inside the
  clean pass, mid-pass of APGD-CE, between APGD-T targets, ...) and resumed from the state it was given,
  returns exactly the uninterrupted result (robust, fell_to, x_adv, accuracy, attacked); twice stopped too.
* unit: eval_progress's multi-process protocol, simulated in one process (two "processes" with different
  points, a fake allgather and guard): both check the same number of positions, stop at the same one, and
  resume to the uninterrupted results.
* end to end (run.py in subprocesses, the tiny digits run; the best checkpoint is epoch 2, held there by
  `tiny_runs.best_until`, the final one epoch 3): SIGTERM inside the final checkpoint's AutoAttack exits 75
  with the resume message; the same command then skips the best checkpoint (finished before the stop),
  resumes the final one's AutoAttack and writes the uninterrupted run's results.json and per-point verdicts.
  The same in --mode=eval (stopped mid-APGD-CE of the best checkpoint), and with another autoattack.seed at
  the restart, which starts afresh and gives what an uninterrupted evaluation with that seed gives. And
  --mode=eval in two processes, SIGTERM to one of them: both stop at the same position, and resume to the
  single-process results.
* unit: a saved state resumes only with the same fingerprint; a damaged file starts afresh.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

import helpers
import tiny_runs
from autolora_jax import autoattack, eval_progress, preemption
from autolora_jax.autoattack.errors import AutoAttackInputError
from autolora_jax.errors import Preempted
from benchmarks import digits_mlp

# A cascade in which two attacks break points (on this MLP APGD-CE first leaves nothing to APGD-T).
SETTINGS = dict(eps=16 / 255, attacks=['square', 'apgd-t', 'apgd-ce'], n_iter=3, n_queries=30,
                n_target_classes=3, seed=0, batch_size=8, progress=False, sanity_checks=False)


class Stop(Exception):
  pass


@pytest.fixture(scope='module')
def mlp():
  images, labels = digits_mlp.digits()
  params = helpers.train_digits_mlp(images, labels, 40)
  return jax.tree_util.Partial(helpers.digits_mlp, params), images[:30], labels[:30]


def _run(mlp, **kwargs):
  fn, x, y = mlp
  return autoattack.run(fn, x, y, **{**SETTINGS, **kwargs})


def _stopped_at(mlp, k, resume=None):
  """The state given to the k-th (1-based) on_progress call of a run (from `resume`), which then stops."""
  seen = []

  def stop(state):
    seen.append(state)
    if len(seen) == k:
      raise Stop
  with pytest.raises(Stop):
    _run(mlp, resume=resume, on_progress=stop)
  return seen[-1]


def _assert_same(got, want):
  np.testing.assert_array_equal(got.robust, want.robust)
  np.testing.assert_array_equal(got.fell_to, want.fell_to)
  np.testing.assert_array_equal(got.x_adv, want.x_adv)
  assert got.accuracy == want.accuracy
  assert set(got.attacked) == set(want.attacked)
  for a in want.attacked:
    np.testing.assert_array_equal(got.attacked[a], want.attacked[a])
  assert set(got.seconds) == set(want.seconds) and got.settings == want.settings


def test_run_resumed_from_any_position_gives_the_uninterrupted_result(mlp):
  states = []
  want = _run(mlp, on_progress=lambda s: states.append(s.copy()))
  assert np.sum(want.fell_to == 'square') >= 1 and np.sum(want.fell_to == 'apgd-t') >= 5
  assert _run(mlp).accuracy == want.accuracy  # the callback changes nothing
  positions = [(s.stage, s.pass_index, s.start, len(s.todo)) for s in states]
  assert (0, 0, 8, 30) in positions  # inside the clean pass
  assert (3, 0, 8, 19) in positions  # APGD-CE (third in this cascade) after its first batch of three
  assert (2, 1, 0, 21) in positions  # APGD-T: the start of its second target, after the first
  for k, position in enumerate(positions, start=1):
    state = _stopped_at(mlp, k)
    assert (state.stage, state.pass_index, state.start, len(state.todo)) == position
    _assert_same(_run(mlp, resume=state), want)
  # Stopped twice: mid-APGD-T, then mid-APGD-CE of the resumed run.
  first = _stopped_at(mlp, positions.index((2, 1, 8, 21)) + 1)
  second = _stopped_at(mlp, 9, resume=first)  # the 1st: the resumed pass begins again at its batch 2
  assert (second.stage, second.start) == (3, 8)
  _assert_same(_run(mlp, resume=second), want)


def test_resume_refuses_a_state_of_other_inputs(mlp):
  state = _stopped_at(mlp, 3)
  fn, x, y = mlp
  with pytest.raises(AutoAttackInputError, match='resume'):
    autoattack.run(fn, x[:20], y[:20], **{**SETTINGS, 'resume': state})
  with pytest.raises(AutoAttackInputError, match='resume'):
    autoattack.run(fn, x, y, **{**SETTINGS, 'attacks': ['apgd-ce'], 'resume': state})


def test_saved_progress_resumes_only_with_the_same_fingerprint(mlp, tmp_path, caplog):
  fn, x, y = mlp
  want = _run(mlp)
  keeper = eval_progress.TestProgress(str(tmp_path), {'test': 1})
  tracker = lambda seed: eval_progress.AutoAttackProgress(keeper, 'best', {'seed': seed}, x)  # noqa: E731
  tracker(0).save(_stopped_at(mlp, 12))  # mid-APGD-T
  path = os.path.join(tmp_path, eval_progress.STATE_DIR, 'autoattack-best.npz')
  state = tracker(0).resume()
  assert (state.stage, state.pass_index, state.start) == (2, 0, 8)
  _assert_same(_run(mlp, resume=state), want)
  with caplog.at_level('INFO', logger='autolora_jax.eval_progress'):
    assert tracker(1).resume() is None and not os.path.exists(path)  # another seed: afresh, file removed
    assert 'starting afresh' in caplog.text and 'seed (0 then, 1 now)' in caplog.text
    tracker(0).save(_stopped_at(mlp, 12))
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    assert tracker(0).resume() is None and 'cannot be read' in caplog.text


class FakeGuard:
  """A multi-process guard stand-in: stops at position `stop_at`; records the positions checked."""
  multiprocess = True
  signal_name = 'SIGTERM'

  def __init__(self, stop_at=None):
    self.stop_at, self.position, self.checked = stop_at, None, []

  def should_stop(self, position):
    self.position = position
    self.checked.append(position)
    return position == self.stop_at


def test_processes_with_different_points_check_the_same_positions(mlp, tmp_path, monkeypatch):
  """Two simulated processes, 30 and 11 points (so their passes have different batch counts): the
  allgather at each pass start gives both the larger count (from a first, unstopped run of each)."""
  fn, x, y = mlp
  shares = {'a': (x, y), 'b': (x[:11], y[:11])}
  counts = {p: {} for p in shares}  # per process, per (stage, pass): its batches
  now = {}

  def allgather(values):
    values = np.asarray(values, np.int32)
    if values.shape == (1,):
      key = now['key']
      counts[now['process']].setdefault(key, int(values[0]))
      return np.array([[counts[p].get(key, 0)] for p in shares], np.int32)
    return np.stack([values] * len(shares))  # resume(): both processes agree
  monkeypatch.setattr(eval_progress, '_allgather', allgather)
  monkeypatch.setattr(eval_progress, 'SAVE_EVERY_S', 1e9)  # saved when stopping only

  def evaluate(process, stop_at=None):
    """(result or None when stopped, positions checked) of one process's AutoAttack, resuming if saved."""
    now['process'] = process
    guard = FakeGuard(stop_at)
    keeper = eval_progress.TestProgress(str(tmp_path / process), {'test': 1}, guard=guard)
    tracker = eval_progress.AutoAttackProgress(keeper, 'best', {'test': 1}, shares[process][0])

    def on_progress(state):
      now['key'] = (state.stage, state.pass_index)
      tracker(state)
    try:
      result = autoattack.run(fn, *shares[process], **{**SETTINGS, 'resume': tracker.resume(),
                                                       'on_progress': on_progress})
    except Preempted:
      return None, guard.checked
    return result, guard.checked

  want = {p: evaluate(p)[0] for p in shares}  # fills `counts` (both processes' batches per pass)
  for p in shares:
    shutil.rmtree(tmp_path / p, ignore_errors=True)
  totals = {p: len(evaluate(p)[1]) for p in shares}
  assert totals['a'] == totals['b'] > sum(counts['b'].values())  # b checks more often than it has batches
  for stop_at in range(1, totals['a'] + 1, 2):
    for p in shares:
      shutil.rmtree(tmp_path / p, ignore_errors=True)
      result, before = evaluate(p, stop_at)
      assert result is None and before == list(range(1, stop_at + 1))
      result, after = evaluate(p)  # the positions go on from 1 in a new process
      assert len(before) + len(after) == totals[p], (p, stop_at)
      _assert_same(result, want[p])


# ---------------------------------------------------------------------------------------------------------
# End to end: run.py in subprocesses
# ---------------------------------------------------------------------------------------------------------

FLAGS = ['--config=tests/tiny_config.py', '--config.auto_lr.max_epochs=3', '--config.auto_lr.lr0=0.2',
         '--config.dataset.classes=(0,1,2,3,4)', '--config.autoattack.num_points=24',
         '--config.autoattack.batch_size=8']


@pytest.fixture(scope='module')
def compile_cache():
  return tiny_runs.cache_env()


def _cli(workdir, cache, hook='', flags=()):
  return tiny_runs.run_python(tiny_runs.cli_code(FLAGS + list(flags) + [f'--workdir={workdir}'], hook),
                              devices=1, timeout=600, **cache)


def _hook(verdicts, sigterm=None):
  hook = f'tiny_runs.best_until(2); tiny_runs.save_autoattack_verdicts({str(verdicts)!r})'
  return hook + (f'; tiny_runs.sigterm_in_autoattack{sigterm!r}' if sigterm else '')


def _results(workdir):
  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if 'seconds' not in k and 'wall' not in k and k != 'command'}
    return tree
  with open(os.path.join(workdir, 'results.json')) as f:
    return strip(json.load(f))


def _assert_same_verdicts(got_dir, want_dir, names=('best', 'final')):
  for name in names:
    with np.load(os.path.join(got_dir, f'{name}.npz')) as got, np.load(os.path.join(want_dir, f'{name}.npz')) as want:
      for key in ('index', 'robust', 'fell_to', 'x_adv'):
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{name}: {key}')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, compile_cache):
  """An uninterrupted run: (workdir, its AutoAttack verdicts' folder)."""
  root = tmp_path_factory.mktemp('uninterrupted')
  workdir, verdicts = str(root / 'run'), root / 'verdicts'
  p = _cli(workdir, compile_cache, _hook(verdicts))
  assert p.returncode == 0, p.stderr[-3000:]
  results = _results(workdir)
  # The tests stop in the final checkpoint's AutoAttack after the best one's: they must differ.
  assert (results['best']['epoch'], results['final']['epoch']) == (2, 3), results
  assert not os.path.exists(os.path.join(workdir, eval_progress.STATE_DIR))
  return workdir, verdicts


def _evaluated_copy(reference_dir, target):
  """A copy of the reference workdir without its results.json, for --mode=eval."""
  shutil.copytree(reference_dir, target)
  os.remove(os.path.join(target, 'results.json'))
  return str(target)


@pytest.mark.slow
def test_sigterm_in_autoattack_then_resume_matches_uninterrupted_run(tmp_path, reference, compile_cache):
  reference_dir, reference_verdicts = reference
  workdir, verdicts = str(tmp_path / 'run'), tmp_path / 'verdicts'
  p = _cli(workdir, compile_cache, _hook(verdicts, ('final', 1, 2)))  # APGD-T's first batch
  assert p.returncode == preemption.EXIT_CODE, p.stderr[-3000:]
  assert re.search(r'Stopped by SIGTERM in the AutoAttack of the final checkpoint \(epoch 3\), after batch 1 '
                   r'of \d+ of apgd-t', p.stderr), p.stderr[-3000:]
  assert f'To resume: python run.py {FLAGS[0]}' in p.stderr and f'--workdir={workdir}' in p.stderr
  assert 'Traceback' not in p.stderr
  state = os.path.join(workdir, eval_progress.STATE_DIR)
  assert sorted(os.listdir(state)) == ['autoattack-final.npz', 'partial_results.json']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  p = _cli(workdir, compile_cache, _hook(verdicts))  # the same command again
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'the best checkpoint (epoch 2) was evaluated before the stop' in p.stderr
  assert 'AutoAttack of the final checkpoint: resuming from' in p.stderr
  assert 'AutoAttack apgd-ce' not in p.stderr  # neither the best's AutoAttack nor the final's APGD-CE again
  assert _results(workdir) == _results(reference_dir)
  _assert_same_verdicts(verdicts, reference_verdicts)
  assert not os.path.exists(state)


@pytest.mark.slow
def test_eval_mode_sigterm_then_resume_matches_uninterrupted(tmp_path, reference, compile_cache):
  reference_dir, reference_verdicts = reference
  workdir, verdicts = _evaluated_copy(reference_dir, tmp_path / 'run'), tmp_path / 'verdicts'
  p = _cli(workdir, compile_cache, _hook(verdicts, ('best', 1, 1)), ['--mode=eval'])
  assert p.returncode == preemption.EXIT_CODE, p.stderr[-3000:]
  assert re.search(r'in the AutoAttack of the best checkpoint \(epoch 2\), after batch 1 of [2-9] of apgd-ce',
                   p.stderr), p.stderr[-3000:]
  assert 'To resume: python run.py' in p.stderr and '--mode=eval' in p.stderr and 'Traceback' not in p.stderr
  assert os.listdir(os.path.join(workdir, eval_progress.STATE_DIR)) == ['autoattack-best.npz']

  p = _cli(workdir, compile_cache, _hook(verdicts), ['--mode=eval'])
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'resuming from' in p.stderr and re.search(r'after batch 1 of [2-9] of apgd-ce', p.stderr)
  got, want = _results(workdir), _results(reference_dir)
  assert {'best', 'final', 'autoattack'} <= set(got) <= set(want)
  assert got == {k: want[k] for k in got}
  _assert_same_verdicts(verdicts, reference_verdicts)
  assert not os.path.exists(os.path.join(workdir, eval_progress.STATE_DIR))


@pytest.mark.slow
def test_eval_mode_changed_seed_at_restart_starts_afresh(tmp_path, reference, compile_cache):
  reference_dir, _ = reference
  seed = ['--mode=eval', '--config.autoattack.seed=1']
  workdir, verdicts = _evaluated_copy(reference_dir, tmp_path / 'run'), tmp_path / 'verdicts'
  p = _cli(workdir, compile_cache, _hook(verdicts, ('best', 1, 1)), ['--mode=eval'])  # seed 0
  assert p.returncode == preemption.EXIT_CODE, p.stderr[-3000:]
  p = _cli(workdir, compile_cache, _hook(verdicts), seed)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'AutoAttack of the best checkpoint: starting afresh' in p.stderr and "seed (0 then, 1 now)" in p.stderr
  assert 'resuming from' not in p.stderr

  uninterrupted, want_verdicts = _evaluated_copy(reference_dir, tmp_path / 'seed1'), tmp_path / 'verdicts1'
  p = _cli(uninterrupted, compile_cache, _hook(want_verdicts), seed)
  assert p.returncode == 0, p.stderr[-3000:]
  got, want = _results(workdir), _results(uninterrupted)
  assert got == want and got['autoattack']['seed'] == 1
  assert got['autoattack']['indices'] != _results(reference_dir)['autoattack']['indices']  # a new sample
  _assert_same_verdicts(verdicts, want_verdicts)


@pytest.mark.slow
def test_eval_mode_in_two_processes_stops_together_and_resumes(tmp_path, reference, compile_cache):
  """SIGTERM to process 1 only, during the best checkpoint's AutoAttack: JAX's preemption service tells
  process 0, both stop at the same position (each saves its own share) and exit 75; the same two commands
  then resume there and finish with the uninterrupted single-process results and per-point verdicts."""
  reference_dir, reference_verdicts = reference
  workdir, verdicts = _evaluated_copy(reference_dir, tmp_path / 'run'), tmp_path / 'verdicts'

  def both(sigterm=None):
    port = tiny_runs.free_port()
    procs = [tiny_runs.start_python(tiny_runs.cli_code(
        FLAGS + ['--mode=eval', f'--workdir={workdir}', f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                 '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
        _hook(verdicts, sigterm if i == 1 else None)), devices=1, **compile_cache) for i in range(2)]
    return [(p, p.communicate(timeout=600)[1]) for p in procs]

  for p, err in both(('best', 1)):
    assert p.returncode == preemption.EXIT_CODE, err[-3000:]
    assert 'Stopped by a preemption notice in the AutoAttack of the best checkpoint' in err
  assert sorted(os.listdir(os.path.join(workdir, eval_progress.STATE_DIR))) == [
      'autoattack-best-p0of2.npz', 'autoattack-best-p1of2.npz']
  for p, err in both():
    assert p.returncode == 0, err[-3000:]
    begins = [line.split()[1:] for line in err.splitlines() if line.startswith('AUTOATTACK_BEGINS')]
    assert begins[0][0] == 'best' and begins[0][1] != 'fresh' and begins[1:] == [['final', 'fresh']], begins
  got, want = _results(workdir), _results(reference_dir)
  assert got == {k: want[k] for k in got} and 'final' in got
  for name in ('best', 'final'):
    parts = [np.load(os.path.join(verdicts, f'{name}-p{i}.npz')) for i in range(2)]
    order = np.argsort(np.concatenate([part['index'] for part in parts]))
    with np.load(os.path.join(reference_verdicts, f'{name}.npz')) as ref:
      for key in ('index', 'robust', 'fell_to', 'x_adv'):
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts])[order], ref[key], err_msg=key)
