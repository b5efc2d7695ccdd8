"""Multi-process runs on one machine: two processes on 127.0.0.1 with two fake CPU devices each.

They run `train_and_evaluate` (jax.distributed.initialize through config.distributed) for two train steps
and must end with identical parameters, equal within 1e-5 to one process with four fake devices on the
same global batches; only process 0 writes the metrics. A stop request reaching one process must stop
both after the same step.
"""

import json
import os

import numpy as np
import pytest

import tiny_runs


@pytest.fixture(scope='module')
def compile_cache():
  return tiny_runs.cache_env()

# Two train steps: digits 5 and 6 give 243 training images, two global batches of 96. AutoAttack across
# processes: tests/test_multihost_eval.py.
OVERRIDES = {'dataset.classes': (5, 6), 'batch_size': 96, 'eval_batch_size': 64, 'autoattack.enabled': False}

DRIVER = '''
import json, sys
import jax
import numpy as np
from flax import traverse_util
import tiny_runs
from autolora_jax import evaluation, experiment, train

workdir, out, process_id, num_processes, port = {args!r}
config = tiny_runs.join(tiny_runs.tiny_config(epochs=1, **{overrides!r}), process_id, num_processes, port)


def local_copies(tree):
  """{{path: (local devices, ...)}}: every local device's copy of a replicated tree, from this process."""
  return {{'/'.join(k): np.stack([np.asarray(s.data) for s in v.addressable_shards]).reshape(
      (jax.local_device_count(),) + v.shape[1:]) for k, v in traverse_util.flatten_dict(tree).items()}}


original_test = evaluation.test
def test(exp, ckpts, final_state, **kwargs):  # keeps this process's final parameters, as held in its device memory
  np.savez(out, **local_copies(final_state.params))
  return original_test(exp, ckpts, final_state, **kwargs)
evaluation.test = test

original_initial_state = experiment.Experiment.initial_state
def initial_state(self):
  state = original_initial_state(self)
  np.savez(out.replace('.npz', '_init.npz'), **{{'/'.join(k): np.asarray(v)[None] for k, v in
                                                  traverse_util.flatten_dict(state.params).items()}})
  return state
experiment.Experiment.initial_state = initial_state

train.train_and_evaluate(config, workdir)
print('TOPOLOGY', json.dumps([jax.process_index(), jax.process_count(), jax.local_device_count(),
                              jax.device_count()]))
'''


def _topology(stdout):
  line = [row for row in stdout.splitlines() if row.startswith('TOPOLOGY')][-1]
  return json.loads(line.split(' ', 1)[1])


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path, compile_cache):
  port = tiny_runs.free_port()
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  procs = [tiny_runs.start_python(DRIVER.format(args=(multi, str(tmp_path / f'p{i}.npz'), i, 2, port),
                                                overrides=OVERRIDES), devices=2, **compile_cache)
           for i in range(2)]
  procs.append(tiny_runs.start_python(DRIVER.format(args=(single, str(tmp_path / 's.npz'), 0, 1, 0),
                                                    overrides=OVERRIDES), devices=4, **compile_cache))
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert [_topology(out) for out, _ in outputs] == [[0, 2, 2, 4], [1, 2, 2, 4], [0, 1, 4, 4]]

  p0, p1, s = (_load(tmp_path / f'{n}.npz') for n in ('p0', 'p1', 's'))
  init = _load(tmp_path / 's_init.npz')
  assert set(p0) == set(p1) == set(s) == set(init)
  moved = max(float(np.max(np.abs(s[k][0] - init[k][0]))) for k in s)
  worst = 0.0
  for k in s:
    for copies in (p0[k], p1[k], s[k]):  # every device of a process holds the same parameters
      np.testing.assert_array_equal(copies, np.broadcast_to(copies[0], copies.shape))
    np.testing.assert_array_equal(p0[k], p1[k])  # both processes agree exactly
    worst = max(worst, float(np.max(np.abs(p0[k][0] - s[k][0]))))
  print(f'max |2 processes x 2 devices - 1 process x 4 devices| = {worst:.3g}; '
        f'max change over the two steps = {moved:.3g}')
  assert worst <= 1e-5
  assert moved > 1e-3  # the two steps did train (so the comparison is not between two initialisations)

  # Both runs trained exactly two steps; only process 0 wrote the metrics (one line per epoch).
  for workdir in (multi, single):
    assert tiny_runs.checkpoint_steps(workdir) == [2]
    assert [r['epoch'] for r in tiny_runs.read_metrics(workdir)] == [0, 1]
    assert os.path.exists(os.path.join(workdir, 'results.json'))


AGREE = '''
import json, os, signal, time
import jax
jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id={pid})
from autolora_jax import preemption
with preemption.Guard() as guard:
  assert guard.multiprocess
  for position in range(1, 400):
    if {pid} == 1 and position == 5:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on one process only
    time.sleep(0.02 * (1 + {pid}))  # the processes run at different speeds
    if guard.should_stop(position):
      break
print('STOPPED', position, guard.signal_name)
'''


@pytest.mark.slow
def test_processes_agree_where_to_stop():
  port = tiny_runs.free_port()
  procs = [tiny_runs.start_python(AGREE.format(port=port, pid=i), devices=1) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  stops = [[row for row in out.splitlines() if row.startswith('STOPPED')][-1].split() for out, _ in outputs]
  assert stops[0][1] == stops[1][1]  # the same position on both
  assert 5 <= int(stops[0][1]) < 399
