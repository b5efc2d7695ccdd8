"""The `autolora-compare` command (python -m autolora_jax.compare): flags in, `study.compare` out."""

from __future__ import annotations

from absl import flags

from autolora_jax import cli, steps
from autolora_jax.compare.plan import (
  DEFAULT_METHODS,
  DEFAULT_SEEDS,
  SWEEP_L2S,
  SWEEP_LR0S,
  SWEEP_LRS,
  SWEEP_SEEDS,
  number_label,
)
from autolora_jax.compare.study import compare

MODULE = 'autolora_jax.compare'
USAGE = ('Pass --config=NAME (a packaged config, e.g. demo; or a config file path such as configs/NAME.py) '
         'and --workdir=DIR (and --methods=..., --seeds=..., --sweep); see docs/methods.md, "Comparing methods and '
         'the sensitivity study".')
STOPPED = ('The comparison stopped there. Running the same compare command again resumes it (finished runs are '
           'skipped, the stopped one resumes): {command}')
FAILED = 'Running the same command again resumes the comparison: {command}'

_FLAGS = {}  # the flags' holders, defined by define_flags() (once per process: absl's flags are global)


def define_flags() -> dict:
  """Defines the command's flags (once) and returns their holders by name."""
  if _FLAGS:
    return _FLAGS
  _FLAGS['config'] = cli.define_config_flag()
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None, 'Folder of the comparison: every run in '
                                          'DIR/<method>/seed<k> (sweep: DIR/sweep/...), and the outputs.')
  _FLAGS['methods'] = flags.DEFINE_string('methods', None, 'Comma list of methods to compare (from '
                                          f'{", ".join(steps.METHODS)}); default without --sweep: '
                                          f'{",".join(DEFAULT_METHODS)} (without twins for a ViT).')
  _FLAGS['seeds'] = flags.DEFINE_string('seeds', None, 'Comma list of seeds (config.seed); default '
                                        f'{",".join(map(str, DEFAULT_SEEDS))} for the comparison, '
                                        f'{",".join(map(str, SWEEP_SEEDS))} for --sweep alone.')
  _FLAGS['sweep'] = flags.DEFINE_bool('sweep', False, 'Run the sensitivity study: vanilla RFT over --sweep_lr x '
                                      '--sweep_l2, and AutoLoRa over --sweep_lr0.')
  _FLAGS['sweep_lr'] = flags.DEFINE_string('sweep_lr', ','.join(map(number_label, SWEEP_LRS)),
                                           'Comma list of config.fixed.lr values for --sweep.')
  _FLAGS['sweep_l2'] = flags.DEFINE_string('sweep_l2', ','.join(map(number_label, SWEEP_L2S)),
                                           'Comma list of config.fixed.l2 values (KL weight) for --sweep.')
  _FLAGS['sweep_lr0'] = flags.DEFINE_string('sweep_lr0', ','.join(map(number_label, SWEEP_LR0S)),
                                            'Comma list of AutoLoRa\'s config.auto_lr.lr0 values for --sweep (none: '
                                            'AutoLoRa at the config\'s lr0 only).')
  flags.mark_flags_as_required(['config', 'workdir'])
  return _FLAGS


def main(command: str) -> None:
  """Runs the comparison and the sweep the flags ask for."""
  values = define_flags()
  config, config_file = cli.load_config(values['config'])
  compare(config, values['workdir'].value, method_names=values['methods'].value, seeds=values['seeds'].value,
          sweep=values['sweep'].value, sweep_lrs=values['sweep_lr'].value, sweep_l2s=values['sweep_l2'].value,
          sweep_lr0s=values['sweep_lr0'].value,
          config_file=config_file, command=command)


def run_cli() -> None:
  """`autolora-compare` (and python -m autolora_jax.compare): flags from sys.argv."""
  define_flags()
  cli.run_command(main, USAGE, MODULE, stopped=STOPPED, failed=FAILED)
