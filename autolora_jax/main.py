"""The training command: flags in, `train_and_evaluate(config, workdir)` out.

    autolora-train --config=demo --workdir=/tmp/demo                # the installed command, any folder
    autolora-train --config=demo --workdir=/tmp/demo --mode=eval    # test evaluation only
    autolora-train --config=cub200 --config.model.arch=resnet50 --workdir=/tmp/cub
    python run.py --config=configs/demo.py --workdir=/tmp/demo      # the same from a checkout
    python -m autolora_jax.main --config=demo --workdir=/tmp/demo   # the same

--config takes a packaged config's name (autolora_jax/configs/NAME.py: demo, cifar10, ...), or a path to a
config file (see autolora_jax/configs/__init__.py and `cli.resolve_config`); autolora_jax/cli.py starts it
(`cli.run_command`).
"""

from absl import flags

from autolora_jax import cli

MODULE = 'autolora_jax.main'
USAGE = ('Pass --config=NAME (a packaged config, e.g. demo; or a config file path such as configs/NAME.py) '
         'and --workdir=DIR; see README.md.')

_FLAGS = {}  # the flags' holders, defined by define_flags() (once per process: absl's flags are global)


def define_flags() -> dict:
  """Defines the command's flags (once) and returns their holders by name."""
  if _FLAGS:
    return _FLAGS
  _FLAGS['config'] = cli.define_config_flag()
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results; a run '
                                          'in it resumes.')
  _FLAGS['overwrite'] = flags.DEFINE_bool('overwrite', False, 'If the workdir holds a run of a different '
                                          'config, move it to WORKDIR/replaced/<time>/ and start afresh '
                                          '(default: refuse).')
  _FLAGS['mode'] = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                                     'train: train (or resume) and evaluate; eval: evaluate the best and the '
                                     'latest checkpoint of a finished workdir on the test split (clean, PGD-10, '
                                     'AutoAttack).')
  flags.mark_flags_as_required(['config', 'workdir'])
  return _FLAGS


def main(command: str) -> None:
  """Trains (or resumes) and evaluates, or evaluates a finished workdir (--mode=eval)."""
  from autolora_jax import evaluation, train  # pylint: disable=g-import-not-at-top
  values = define_flags()
  config, _ = cli.load_config(values['config'])
  workdir = values['workdir'].value
  if values['mode'].value == 'eval':
    evaluation.evaluate_workdir(config, workdir)
  else:
    train.train_and_evaluate(config, workdir, overwrite=values['overwrite'].value, command=command)


def run() -> None:
  """The `autolora-train` command (and run.py, python -m autolora_jax.main): flags from sys.argv."""
  define_flags()
  cli.run_command(main, USAGE, MODULE, omit=('--overwrite',))


if __name__ == '__main__':
  run()
