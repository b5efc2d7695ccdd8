"""Tiny end-to-end runs for the fault-tolerance tests: a narrow model on the digits, run in subprocesses.

Multi-device runs need XLA_FLAGS before jax is imported, and signals need a process of their own, so the
tests drive `train_and_evaluate` (or run.py) in fresh interpreters; `run_python` starts one.
"""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')


def digits_demo():
  """configs/demo.py on scikit-learn's 8x8 digits (1,797 images, a third of mnist5k's per class: the tests'
  runs stay short) at eps 8/255, AutoAttack on 64 test points."""
  from autolora_jax.configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.dataset.name = 'digits'
  config.dataset.test_fraction = 0.25
  config.pretrain.dataset.name = 'digits'
  config.attack.eps = 8 / 255
  config.attack.step_size = 2 / 255
  config.autoattack.num_points = 64
  config.autoattack.batch_size = 64
  return config


def tiny_config(epochs: int = 2, **overrides):
  """The digits demo with a width-8 ResNet-18 at 8x8, PGD-2, no pre-training and `epochs` epochs."""
  config = digits_demo()
  config.model.width = 8
  config.model.input_size = 8
  config.model.lora_rank = 4
  config.model.conv_impl = 'native'  # compiles about twice as fast as im2col on CPU
  config.pretrain.epochs = 0
  config.pretrain.dataset.name = ''
  config.attack.train_steps = 2
  config.attack.eval_steps = 2
  config.auto_lr.max_epochs = epochs
  config.batch_size = 64
  config.eval_batch_size = 128
  config.progress = False
  config.tensorboard = False
  return with_overrides(config, overrides)


def with_overrides(config, overrides: dict):
  """Sets each dotted key of `overrides` (e.g. 'attack.eps') in `config`; returns config."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def join(config, process_id: int, num_processes: int, port: int):
  """`config` as process `process_id` of a job of `num_processes` on 127.0.0.1:`port` (one: as it is)."""
  if num_processes > 1:
    config.distributed.coordinator_address = f'127.0.0.1:{port}'
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
  return config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env_for(devices: int, **extra) -> dict:
  """This process's environment for a subprocess with `devices` fake CPU devices: the XLA_FLAGS set here are
  kept, their device count replaced."""
  env = dict(os.environ)
  kept = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env.update({'XLA_FLAGS': ' '.join(kept + [f'--xla_force_host_platform_device_count={devices}']),
              'PYTHONPATH': os.pathsep.join([ROOT, TESTS]), 'TF_CPP_MIN_LOG_LEVEL': '2',
              'JAX_PLATFORMS': 'cpu'})
  env.update(extra)
  return env


def run_python(code: str, devices: int = 1, timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter with `devices` fake CPU devices; returns the completed process."""
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env_for(devices, **extra_env),
                        capture_output=True, text=True, timeout=timeout)


def start_python(code: str, devices: int = 1, **extra_env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env=env_for(devices, **extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(workdir: str, drop=('train_seconds', 'images_per_second')):
  """metrics.jsonl as a list of dicts without the timing fields."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f if line.strip()]


def cache_env(cache_dir: str = '') -> dict:
  """Environment for JAX's persistent compilation cache (by default the test session's, conftest.py): runs
  of one program compile it once, whichever test or process ran it first (programs that compile in under
  0.1 s, single operations, are not written)."""
  return {'JAX_COMPILATION_CACHE_DIR': str(cache_dir or os.environ['JAX_COMPILATION_CACHE_DIR']),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.1', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
          'JAX_COMPILATION_CACHE_MAX_SIZE': str(4 << 30)}


# -- hooks for runs in subprocesses (test code only: they wrap library functions from the outside) ---------

def sigterm_at(epoch: int, step: int) -> None:
  """Makes this process send itself SIGTERM while train step `step` (0-based) of `epoch` runs."""
  import signal  # pylint: disable=g-import-not-at-top

  from autolora_jax import loop  # pylint: disable=g-import-not-at-top
  original = loop.train_epoch

  def train_epoch(*args, on_step=None, **kwargs):
    def hook(state, s):
      if (kwargs['epoch'], s) == (epoch, step):
        os.kill(os.getpid(), signal.SIGTERM)
      return on_step(state, s) if on_step is not None else False
    return original(*args, on_step=hook, **kwargs)

  loop.train_epoch = train_epoch


def best_until(epoch: int) -> None:
  """Makes no epoch after `epoch` a new best (the validation still runs and is recorded): a run whose best
  and final checkpoints must differ keeps them apart on every CPU kind, whatever the round-off does to a
  tiny run's close validation numbers."""
  from autolora_jax import policy  # pylint: disable=g-import-not-at-top
  original = policy._track_best  # pylint: disable=protected-access

  def track_best(state, at, measured):
    if at > epoch:
      return state._replace(history=state.history + (float(measured['pgd']),)), False
    return original(state, at, measured)

  policy._track_best = track_best  # pylint: disable=protected-access


def sigterm_in_autoattack(checkpoint: str, batch: int, stage: int = 0) -> None:
  """Makes this process send itself SIGTERM while AutoAttack batch `batch` (1-based, counted over the attack
  batches of all passes, the clean pass not counted; with `stage`, over that attack's passes alone: 1 is the
  cascade's first attack) of the test of `checkpoint` ('best' or 'final') ends: the evaluation then stops
  after that batch. A stage pins the stop to an attack whatever the number of points each attack gets."""
  import signal  # pylint: disable=g-import-not-at-top

  from autolora_jax import autoattack  # pylint: disable=g-import-not-at-top
  original = autoattack.run

  def run(*args, on_progress=None, desc='AA', **kwargs):
    seen = {'key': None, 'batches': 0}

    def hook(state):
      key = (state.stage, state.pass_index)
      counted = state.stage > 0 if not stage else state.stage == stage
      if key == seen['key'] and counted:  # after a batch (a new key: a pass begins)
        seen['batches'] += 1
        if desc == f'AA ({checkpoint})' and seen['batches'] == batch:
          os.kill(os.getpid(), signal.SIGTERM)
      seen['key'] = key
      if on_progress is not None:
        on_progress(state)
    return original(*args, on_progress=hook, desc=desc, **kwargs)

  autoattack.run = run


def save_autoattack_verdicts(folder: str) -> None:
  """Makes every AutoAttack of the test print where it begins (AUTOATTACK_BEGINS <checkpoint> fresh, or the
  (stage, pass, start) it resumes at) and write its per-point outcome (robust, fell_to, x_adv, the points'
  indices) to folder/<checkpoint>.npz (multi-process: <checkpoint>-p<process index>.npz) when it finishes."""
  import sys  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from autolora_jax import autoattack  # pylint: disable=g-import-not-at-top
  original = autoattack.run

  def run(*args, desc='AA', point_index=None, resume=None, **kwargs):
    name = desc[desc.find('(') + 1:desc.rfind(')')] if '(' in desc else desc
    where = 'fresh' if resume is None else f'{resume.stage},{resume.pass_index},{resume.start}'
    print('AUTOATTACK_BEGINS', name, where, file=sys.stderr, flush=True)
    result = original(*args, desc=desc, point_index=point_index, resume=resume, **kwargs)
    os.makedirs(folder, exist_ok=True)
    file = name if jax.process_count() == 1 else f'{name}-p{jax.process_index()}'
    np.savez(os.path.join(folder, f'{file}.npz'), robust=result.robust, fell_to=result.fell_to,
             x_adv=result.x_adv, index=np.asarray(point_index))
    return result

  autoattack.run = run


def sigterm_during_save(epoch: int) -> None:
  """Makes this process send itself SIGTERM as soon as the checkpoint at the end of `epoch` is handed to
  Orbax (saved asynchronously: still being written); prints SAVING_AT_SIGTERM and whether it was."""
  import signal  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top
  original = checkpoints.Checkpoints.save

  def save(self, which, step, state, meta):
    original(self, which, step, state, meta)
    if which == 'latest' and meta.get('epoch') == epoch and not meta.get('position'):
      print('SAVING_AT_SIGTERM', self.managers[which].is_saving_in_progress(), file=sys.stderr, flush=True)
      os.kill(os.getpid(), signal.SIGTERM)

  checkpoints.Checkpoints.save = save


def nan_images_at(epoch: int, step: int) -> None:
  """Makes the training batch of (epoch, step) all NaN, so that its loss is NaN."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from autolora_jax.data import memory  # pylint: disable=g-import-not-at-top
  original = memory.ArrayDataset.train_batches

  def train_batches(self, e, global_batch, start_step=0):
    for s, batch in enumerate(original(self, e, global_batch, start_step), start=start_step):
      if (e, s) == (epoch, step):
        batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
      yield batch

  memory.ArrayDataset.train_batches = train_batches


def cli_code(argv, hook: str = '') -> str:
  """Python code that runs run.py with `argv` (flags) after the hook statement `hook` (e.g.
  'tiny_runs.sigterm_at(2, 1)')."""
  return ('import runpy, sys\nimport tiny_runs\n' + (hook + '\n' if hook else '') +
          f'sys.argv = {["run.py"] + list(argv)!r}\nrunpy.run_path("run.py", run_name="__main__")\n')


def restore_tree(directory: str):
  """The arrays of an Orbax item folder (e.g. checkpoints/latest/<step>/state) as a flat dict of numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.abspath(directory))
  return {jax.tree_util.keystr(path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def checkpoint_meta(workdir: str, which: str, step: int) -> dict:
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'checkpoints', which, str(step), 'meta', 'metadata')) as f:
    return json.load(f)


def checkpoint_steps(workdir: str, which: str = 'latest'):
  folder = os.path.join(workdir, 'checkpoints', which)
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def stopped_then_resumed(make_config, workdir: str, monkeypatch, epoch: int) -> dict:
  """Runs `train.train_and_evaluate(make_config(), workdir)` until epoch `epoch`'s latest checkpoint is saved,
  stops it there (an exception), runs it again to the end and returns the resumed run's results."""
  import pytest  # pylint: disable=g-import-not-at-top

  from autolora_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
  original_save = checkpoints.Checkpoints.save

  class Stop(Exception):
    pass

  def save_then_die(self, which, step, state, meta):
    original_save(self, which, step, state, meta)
    if which == 'latest' and meta['epoch'] == epoch:
      raise Stop()

  monkeypatch.setattr(checkpoints.Checkpoints, 'save', save_then_die)
  with pytest.raises(Stop):
    train.train_and_evaluate(make_config(), workdir)
  monkeypatch.setattr(checkpoints.Checkpoints, 'save', original_save)
  return train.train_and_evaluate(make_config(), workdir)
