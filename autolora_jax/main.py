"""The training command: flags in, `train_and_evaluate(config, workdir)` out.

    autolora-train --config=demo --workdir=/tmp/demo                # the installed command, any folder
    autolora-train --config=demo --workdir=/tmp/demo --mode=eval    # test evaluation only
    autolora-train --config=cub200 --config.model.arch=resnet50 --workdir=/tmp/cub
    python run.py --config=configs/demo.py --workdir=/tmp/demo      # the same from a checkout
    python -m autolora_jax.main --config=demo --workdir=/tmp/demo   # the same

--config takes a packaged config's name (autolora_jax/configs/NAME.py: demo, cifar10, ...), or a path to a
config file (see autolora_jax/configs/__init__.py and `cli.resolve_config`).
"""

import logging as std_logging
import os
import shlex
import shutil
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (data, TensorBoard) only for errors

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

from autolora_jax import cli  # pylint: disable=g-import-not-at-top

USAGE = ('Pass --config=NAME (a packaged config, e.g. demo; or a config file path such as configs/NAME.py) '
         'and --workdir=DIR; see README.md.')
CONSOLE_SCRIPT = 'autolora-train'

_FLAGS = {}  # the flags' holders, defined by define_flags() (once per process: absl's flags are global)


def define_flags() -> dict:
  """Defines the command's flags (once) and returns their holders by name."""
  if _FLAGS:
    return _FLAGS
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'A packaged config by name (demo, cifar10, ...: autolora_jax/configs/NAME.py), or a '
      'config file path.', lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results; a run '
                                          'in it resumes.')
  _FLAGS['overwrite'] = flags.DEFINE_bool('overwrite', False, 'If the workdir holds a run of a different '
                                          'config, move it to WORKDIR/replaced/<time>/ and start afresh '
                                          '(default: refuse).')
  _FLAGS['mode'] = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                                     'train: train (or resume) and evaluate; eval: evaluate the best and the '
                                     'latest checkpoint of a finished workdir on the test split (clean, PGD-10, '
                                     'AutoAttack).')
  _FLAGS['compilation_cache'] = flags.DEFINE_string(
      'compilation_cache', None, 'Folder of the persistent cache of compiled programs (default: '
      '~/.cache/autolora-jax/xla, or $XDG_CACHE_HOME/autolora-jax/xla); a second run of a config compiles '
      'nothing. Empty: no cache.')
  flags.mark_flags_as_required(['config', 'workdir'])
  return _FLAGS


def command_prefix(argv0: str) -> list:
  """How this process was started, as the words before the flags of a command that repeats it:
  ['python', 'run.py'] (a script), ['python', '-m', 'autolora_jax.main'], or ['autolora-train'] (the
  console script; its full path where that name on PATH is another program or none)."""
  base = os.path.basename(argv0)
  if base.endswith('.py'):
    if os.path.abspath(argv0) == os.path.abspath(__file__):
      return ['python', '-m', 'autolora_jax.main']
    return ['python', argv0]
  found = shutil.which(base)
  if found and os.path.exists(argv0) and os.path.samefile(found, argv0):
    return [base]
  return [argv0]


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value.')
  values = define_flags()
  from autolora_jax import errors, evaluation, preemption, train  # pylint: disable=g-import-not-at-top
  from autolora_jax.ops import host  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # libraries: warnings only
  std_logging.getLogger('autolora_jax').setLevel(std_logging.INFO)  # this project: progress messages
  # CPU runs only (both do nothing on GPU and TPU hosts), before the first computation:
  host.retain_freed_memory()  # no page faults for XLA's per-step buffers (see autolora_jax/ops/host.py)
  host.set_xla_cpu_flags()  # XLA's own CPU convolution kernels (see autolora_jax/ops/host.py)
  cache = values['compilation_cache'].value
  host.enable_compilation_cache(host.default_compilation_cache_dir() if cache is None else cache)
  config, workdir = values['config'].value, values['workdir'].value
  command = shlex.join(command_prefix(sys.argv[0]) + [a for a in sys.argv[1:] if not a.startswith('--overwrite')])
  try:
    if values['mode'].value == 'eval':
      evaluation.evaluate_workdir(config, workdir)
    else:
      train.train_and_evaluate(config, workdir, overwrite=values['overwrite'].value, command=command)
  except errors.input_errors() as e:
    cli.fail(str(e))
  except errors.NonFiniteLossError as e:
    cli.fail(str(e), status=1)
  except errors.Preempted as e:
    print(f'{e}\nTo resume: {command}', file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)


def run() -> None:
  """The `autolora-train` command (and run.py, python -m autolora_jax.main): flags from sys.argv."""
  define_flags()
  app.run(main, flags_parser=cli.make_flags_parser(USAGE))


if __name__ == '__main__':
  run()
