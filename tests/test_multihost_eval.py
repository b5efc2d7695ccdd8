"""`--mode=eval` (evaluation.evaluate_workdir) in two processes on 127.0.0.1, two fake CPU devices each: it
joins the job through jax.distributed (config.distributed), and the one results.json it writes (process 0)
equals the one a single process with four devices writes for the same workdir, AutoAttack included."""

import json
import os
import shutil

import pytest

import tiny_runs

# digits 5 and 6: 243 training images; test: a quarter of each class. AutoAttack on 40 of the test points,
# so that each process attacks points of its own.
OVERRIDES = {'dataset.classes': (5, 6), 'batch_size': 96, 'eval_batch_size': 64, 'autoattack.enabled': True,
             'autoattack.num_points': 40, 'autoattack.batch_size': 16, 'autoattack.version': 'fast'}

DRIVER = '''
import json
import jax
import tiny_runs
from autolora_jax import evaluation, train

mode, workdir, process_id, num_processes, port = {args!r}
config = tiny_runs.join(tiny_runs.tiny_config(epochs=1, **{overrides!r}), process_id, num_processes, port)
if mode == 'train':
  config.autoattack.enabled = False
  train.train_and_evaluate(config, workdir)
else:
  evaluation.evaluate_workdir(config, workdir)
print('TOPOLOGY', json.dumps([jax.process_index(), jax.process_count(), jax.device_count()]))
'''

TIMINGS = ('wall_seconds', 'eval_seconds', 'seconds')


def _driver(mode, workdir, pid, n, port):
  return DRIVER.format(args=(mode, workdir, pid, n, port), overrides=OVERRIDES)


def _results(workdir):
  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if k not in TIMINGS}
    return tree
  with open(os.path.join(workdir, 'results.json')) as f:
    return strip(json.load(f))


@pytest.mark.slow
def test_eval_mode_in_two_processes_writes_the_one_process_results(tmp_path):
  cache = tiny_runs.cache_env()
  trained = str(tmp_path / 'trained')
  p = tiny_runs.run_python(_driver('train', trained, 0, 1, 0), devices=4, timeout=900, **cache)
  assert p.returncode == 0, p.stderr[-3000:]
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  for copy in (single, multi):
    shutil.copytree(trained, copy)

  one = tiny_runs.run_python(_driver('eval', single, 0, 1, 0), devices=4, timeout=900, **cache)
  assert one.returncode == 0, one.stderr[-3000:]
  port = tiny_runs.free_port()
  procs = [tiny_runs.start_python(_driver('eval', multi, i, 2, port), devices=2, **cache) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  topologies = [json.loads([row for row in out.splitlines() if row.startswith('TOPOLOGY')][-1].split(' ', 1)[1])
                for out in [one.stdout] + [o for o, _ in outputs]]
  assert topologies == [[0, 1, 4], [0, 2, 4], [1, 2, 4]]

  got, want = _results(multi), _results(single)
  assert 'autoattack' in want['best']['test'] and want['autoattack']['num_points'] == 40
  assert got == want
