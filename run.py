"""Runs AutoLoRa robust fine-tuning: flags in, `train_and_evaluate(config, workdir)` out.

    python run.py --config=configs/demo.py --workdir=/tmp/demo
    python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=eval   # test evaluation only
    python run.py --config=configs/cub200.py --config.model.arch=resnet50 --workdir=/tmp/cub
"""

import logging as std_logging
import os
import shlex
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (data, TensorBoard) only for errors

from absl import app, flags, logging
from ml_collections import config_flags

from autolora_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results; a run in it resumes.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'If the workdir holds a run of a different config, move '
                               'it to WORKDIR/replaced/<time>/ and start afresh (default: refuse).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (or resume) and evaluate; eval: evaluate the best and the latest '
                          'checkpoint of a finished workdir on the test split (clean, PGD-10, AutoAttack).')
_CACHE = flags.DEFINE_string('compilation_cache', None, 'Folder of the persistent cache of compiled programs '
                             '(default: ~/.cache/autolora-jax/xla, or $XDG_CACHE_HOME/autolora-jax/xla); a '
                             'second run of a config compiles nothing. Empty: no cache.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value.')
  from autolora_jax import errors, evaluation, preemption, train  # pylint: disable=g-import-not-at-top
  from autolora_jax.ops import host  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # libraries: warnings only
  std_logging.getLogger('autolora_jax').setLevel(std_logging.INFO)  # this project: progress messages
  # CPU runs only (both do nothing on GPU and TPU hosts), before the first computation:
  host.retain_freed_memory()  # no page faults for XLA's per-step buffers (see autolora_jax/ops/host.py)
  host.set_xla_cpu_flags()  # XLA's own CPU convolution kernels (see autolora_jax/ops/host.py)
  host.enable_compilation_cache(host.default_compilation_cache_dir() if _CACHE.value is None
                                else _CACHE.value)
  try:
    if _MODE.value == 'eval':
      evaluation.evaluate_workdir(_CONFIG.value, _WORKDIR.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except errors.input_errors() as e:
    cli.fail(str(e))
  except errors.NonFiniteLossError as e:
    cli.fail(str(e), status=1)
  except errors.Preempted as e:
    command = shlex.join(['python'] + [a for a in sys.argv if not a.startswith('--overwrite')])
    print(f'{e}\nTo resume: {command}', file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.make_flags_parser(
      'Pass --config=configs/NAME.py and --workdir=DIR; see README.md.'))
