"""A damaged checkpoint is survived: the newest intact one takes over and the damaged folder is kept.

* The newest latest checkpoint truncated: the run moves it to checkpoints/damaged/, resumes from the
  previous one and ends with the metrics, parameters and results of the run that was never damaged.
* The best checkpoint truncated: the test reports the final state as "best" (results.json: best_lost).
* Every latest checkpoint truncated: a clear CheckpointError, nothing moved or deleted (and --mode=eval
  says to train instead).
* Checkpoints itself: damaged JSON metadata, a best checkpoint lost while training, "does not fit" kept
  apart from "damaged", and the folders of variables (converted checkpoints, the pre-trained FE cache); a
  damaged FE cache is moved aside and pre-trained again.
"""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

import tiny_runs
from autolora_jax import checkpoints, compat, evaluation, experiment, pretrain, train
from autolora_jax.errors import CheckpointError, DamagedCheckpointError


def _config():
  config = tiny_runs.tiny_config(epochs=2)
  config.dataset.classes = (5, 6, 7)
  config.autoattack.enabled = False  # not what is tested here: the runs stay short
  return config


def _truncate(folder: str) -> None:
  """Truncates every OCDBT data file under `folder` to half its size."""
  files = [p for p in glob.glob(os.path.join(folder, '**', 'd', '*'), recursive=True) if os.path.isfile(p)]
  assert files, folder
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def _files(folder: str) -> dict:
  """{relative path: size} of every file under `folder`."""
  return {os.path.relpath(os.path.join(d, n), folder): os.path.getsize(os.path.join(d, n))
          for d, _, names in os.walk(folder) for n in names}


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return {k: v for k, v in json.load(f).items() if k != 'wall_seconds'}


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished two-epoch run: (workdir, its latest checkpoint steps)."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  train.train_and_evaluate(_config(), workdir)
  steps = tiny_runs.checkpoint_steps(workdir)
  assert len(steps) == 2
  return workdir, steps


def _copy(finished, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  return workdir


@pytest.mark.slow
def test_truncated_newest_latest_resumes_from_the_previous_one(finished, tmp_path, caplog):
  reference, (first, last) = finished
  workdir = _copy(finished, tmp_path)
  damaged = os.path.join(workdir, 'checkpoints', 'latest', str(last))
  _truncate(os.path.join(damaged, 'state'))
  before = _files(damaged)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(_config(), workdir)
  kept = os.path.join(workdir, 'checkpoints', 'damaged', f'latest-{last}')
  (message,) = [m for m in _warnings(caplog) if 'Damaged latest checkpoint' in m]
  assert f'{damaged} (epoch 2) cannot be read (OUT_OF_RANGE: ' in message
  assert f'it is kept, moved to {kept} (nothing is deleted)' in message
  assert (f'The run resumes from the newest intact checkpoint, '
          f'{os.path.join(workdir, "checkpoints", "latest", str(first))} (step {first}, epoch 1), and trains '
          'the epochs after it again.') in message
  assert _files(kept) == before  # the damaged checkpoint is kept as it was
  # Epoch 2 was trained again: the same metrics, final state and results as the run never damaged.
  assert tiny_runs.checkpoint_steps(workdir) == [first, last]
  assert tiny_runs.read_metrics(workdir) == tiny_runs.read_metrics(reference)
  a, b = (tiny_runs.restore_tree(os.path.join(w, 'checkpoints', 'latest', str(last), 'state'))
          for w in (workdir, reference))
  assert set(a) == set(b) and len(a) > 100
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert _results(workdir) == _results(reference)


def test_damaged_best_is_replaced_by_the_final_state_in_the_test(finished, tmp_path, caplog):
  reference, _ = finished
  workdir = _copy(finished, tmp_path)
  (best_step,) = tiny_runs.checkpoint_steps(workdir, 'best')
  damaged = os.path.join(workdir, 'checkpoints', 'best', str(best_step))
  _truncate(os.path.join(damaged, 'state'))
  before = _files(damaged)
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(_config(), workdir)  # finished: only the test runs again
  kept = os.path.join(workdir, 'checkpoints', 'damaged', f'best-{best_step}')
  (message,) = [m for m in _warnings(caplog) if 'Damaged best checkpoint' in m]
  assert (f'{damaged} (epoch {best_step}) cannot be read (OUT_OF_RANGE: ') in message
  assert f'it is kept, moved to {kept} (nothing is deleted). The test evaluates the final state (epoch 2) ' \
      'as "best" too (results.json: "best_lost").' in message
  assert _files(kept) == before
  expected = _results(reference)
  assert results['best_lost'] is True and results['best']['epoch'] == 2
  assert results['best']['test'] == expected['final']['test']
  assert results['final']['test'] == expected['final']['test']
  assert tiny_runs.checkpoint_steps(workdir) == tiny_runs.checkpoint_steps(reference)  # latest untouched


def test_no_readable_latest_is_a_clear_error_and_moves_nothing(finished, tmp_path, caplog):
  workdir = _copy(finished, tmp_path)
  for step in finished[1]:
    _truncate(os.path.join(workdir, 'checkpoints', 'latest', str(step), 'state'))
  before = _files(workdir)
  root = os.path.join(workdir, 'checkpoints')
  with pytest.raises(DamagedCheckpointError) as e:
    train.train_and_evaluate(_config(), workdir)
  message = str(e.value)
  assert isinstance(e.value, CheckpointError)  # bad input: run.py prints it alone, exit status 2
  assert message.startswith(f'No checkpoint in {os.path.join(root, "latest")} can be read: ')
  for step in finished[1]:
    assert f'{os.path.join(root, "latest", str(step))} (OUT_OF_RANGE: ' in message
  assert 'Nothing was moved or deleted.' in message
  assert f'move {root} away (e.g. to {root}.damaged) to start this run afresh' in message
  assert _files(workdir) == before and not os.path.exists(os.path.join(root, 'damaged'))
  # --mode=eval does not fall back: it says that training resumes from the newest intact checkpoint.
  with pytest.raises(CheckpointError, match=r'cannot be read \(OUT_OF_RANGE: .*--mode=eval evaluates the '
                     r'newest checkpoint only\. Run the same command with --mode=train'):
    evaluation.evaluate_workdir(_config(), workdir)
  assert _files(workdir) == before
  assert not any('Damaged' in m for m in _warnings(caplog))


def test_eval_mode_with_a_damaged_newest_latest_moves_nothing(finished, tmp_path, caplog):
  """--mode=eval evaluates the newest checkpoint or says why it cannot; it never falls back to an older one
  (its metadata, read first for the input normalisation, included)."""
  last = finished[1][-1]
  for item in ('state', 'meta'):
    newest = _copy(finished, tmp_path / item)
    if item == 'state':
      _truncate(os.path.join(newest, 'checkpoints', 'latest', str(last), 'state'))
    else:
      for path in glob.glob(os.path.join(newest, 'checkpoints', 'latest', str(last), 'meta', '*')):
        with open(path, 'w') as f:
          f.write('{"epoch": ')  # JSON cut short
    before = _files(newest)
    with pytest.raises(CheckpointError, match=rf'{last}.* cannot be read .*--mode=eval evaluates the newest '
                       r'checkpoint only'):
      evaluation.evaluate_workdir(_config(), newest)
    assert _files(newest) == before, item
  assert not any('Damaged' in m for m in _warnings(caplog))


# -- Checkpoints on small trees ---------------------------------------------------------------------------

def _tree(value):
  return {'params': {'w': np.full((4, 3), value, np.float32)}, 'step': np.asarray(value, np.int32)}


def test_damaged_meta_falls_back_and_best_lost_says_what_happens_instead(tmp_path, caplog):
  ckpts = checkpoints.Checkpoints(str(tmp_path))
  for step in (3, 6):
    ckpts.save('latest', step, _tree(step), {'epoch': step // 3, 'done': False})
  ckpts.save('best', 2, _tree(2), {'epoch': 2, 'val': {}})
  ckpts.wait()  # the saves are asynchronous: on disk from here on, to be damaged
  meta_file = os.path.join(tmp_path, 'checkpoints', 'latest', '6', 'meta', 'metadata')
  os.truncate(meta_file, os.path.getsize(meta_file) // 2)
  with caplog.at_level(logging.WARNING):
    assert ckpts.restore_meta('latest') == {'epoch': 1, 'done': False, 'format_version': compat.FORMAT_VERSION}
  (message,) = _warnings(caplog)
  assert 'latest/6 cannot be read (JSONDecodeError: ' in message and 'damaged/latest-6' in message
  assert ckpts.managers['latest'].all_steps() == [3]
  assert os.path.isfile(os.path.join(tmp_path, 'checkpoints', 'damaged', 'latest-6', 'meta', 'metadata'))
  state, _ = ckpts.restore('latest', _tree(0))
  assert int(state['step']) == 3

  _truncate(os.path.join(tmp_path, 'checkpoints', 'best', '2', 'state'))
  with pytest.raises(DamagedCheckpointError, match='best/2 cannot be read'):
    ckpts.restore('best', _tree(0), step=2)  # a given step: no fallback, nothing moved
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert ckpts.restore('best', _tree(0), if_lost='The run keeps its weights.') is None
  (message,) = _warnings(caplog)
  root = os.path.join(tmp_path, 'checkpoints')
  assert message.startswith(f'Damaged best checkpoint: {root}/best/2 (epoch 2) cannot be read (OUT_OF_RANGE')
  assert message.endswith(f'moved to {root}/damaged/best-2 (nothing is deleted). The run keeps its weights.')
  assert ckpts.latest_step('best') is None
  ckpts.save('best', 5, _tree(5), {'epoch': 5})  # a new best does not touch the kept one
  ckpts.wait()
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', 'damaged', 'best-2', 'state'))
  ckpts.close()


def test_a_checkpoint_that_does_not_fit_is_not_damaged(tmp_path):
  ckpts = checkpoints.Checkpoints(str(tmp_path))
  ckpts.save('latest', 1, _tree(1), {'epoch': 1})
  other = {'params': {'w': np.zeros((4, 5), np.float32)}, 'step': np.asarray(0, np.int32)}
  with pytest.raises(CheckpointError, match=r"does not fit the model this config builds \(shape mismatches "
                     r"\[\"\['params'\]\['w'\]: \(4, 3\) stored, \(4, 5\) expected\"\]\)") as e:
    ckpts.restore('latest', other)
  assert not isinstance(e.value, DamagedCheckpointError)
  assert ckpts.managers['latest'].all_steps() == [1]  # nothing moved
  ckpts.close()


def test_folders_of_variables(tmp_path):
  folder = checkpoints.save_variables(str(tmp_path / 'a' / 'fe'), _tree(7), {'arch': 'x'})
  assert checkpoints.has_variables(folder) and not checkpoints.has_variables(str(tmp_path))
  variables, meta = checkpoints.restore_variables(folder)
  assert meta == {'arch': 'x'} and np.all(variables['params']['w'] == 7)
  variables, _ = checkpoints.restore_variables(folder, _tree(0))
  assert variables['params']['w'].shape == (4, 3)
  _truncate(os.path.join(folder, 'variables'))
  with pytest.raises(DamagedCheckpointError, match=f'The checkpoint {folder} cannot be read'):
    checkpoints.restore_variables(folder)


@pytest.mark.slow
def test_a_damaged_pretrain_cache_is_moved_aside_and_made_again(tmp_path, caplog):
  config = tiny_runs.tiny_config(**{'pretrain.epochs': 1, 'pretrain.dataset.name': 'digits',
                                    'pretrain.dataset.classes': (5, 6, 7), 'pretrain.batch_size': 64})
  workdir = str(tmp_path)
  plan = experiment.pretrain_plan(config, workdir)
  first = pretrain.pretrain_in_process(plan, progress=False)
  cached = os.path.join(plan.folder, '1')
  _truncate(os.path.join(cached, 'variables'))
  before = _files(cached)
  with caplog.at_level(logging.WARNING):
    again = pretrain.pretrain_in_process(plan, progress=False)
  kept = os.path.join(plan.folder, 'damaged-1')
  (message,) = _warnings(caplog)
  assert message.startswith(f'The cached pre-trained FE {cached} cannot be read (OUT_OF_RANGE')
  assert message.endswith(f'it is kept, moved to {kept} (nothing is deleted), and the FE is pre-trained '
                          'again.')
  assert _files(kept) == before
  for a, b in zip(*(jax.tree_util.tree_leaves(v) for v in (first, again))):  # the same FE, cached again
    np.testing.assert_array_equal(a, b)
  cached_again, _ = checkpoints.restore_variables(cached)
  for a, b in zip(*(jax.tree_util.tree_leaves(v) for v in (first, cached_again))):
    np.testing.assert_array_equal(a, b)
