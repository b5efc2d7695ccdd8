"""Small pieces shared by the command-line entry points (run.py, python -m autolora_jax.compare).

`fail` prints a one-paragraph error and exits (status 2 for bad input). `make_flags_parser` is an absl
`flags_parser` that turns a config file that does not exist (`check_config_file`, looked at before absl
parses the flags: the config loader would otherwise end in a traceback) or a bad `--config.KEY=VALUE`
override into such an error.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Optional, Sequence

from absl import flags

from autolora_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(ROOT, 'configs')


def config_flag_value(argv: Sequence[str], flag: str = 'config') -> Optional[str]:
  """The value of --FLAG=VALUE (or --FLAG VALUE) in argv; the last one wins; None if absent."""
  value = None
  args = list(argv)
  for i, arg in enumerate(args):
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{flag}='):
        value = arg[len(dashes) + len(flag) + 1:]
      elif arg == f'{dashes}{flag}' and i + 1 < len(args):
        value = args[i + 1]
  return value


def available_configs(configs_dir: str = CONFIGS_DIR) -> list:
  """configs/NAME.py files an entry point can be given (relative to the repository root)."""
  return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(configs_dir, '*.py'))
                if not p.endswith('__init__.py'))


def config_file_problem(path: str, configs_dir: str = CONFIGS_DIR) -> Optional[str]:
  """A one-paragraph message if the config file `path` cannot be loaded; None if it exists.

  A `PATH:ARGUMENT` value (a config file's optional argument) is checked for PATH.
  """
  if path is None:
    return None
  candidate = path
  if not os.path.isfile(candidate) and ':' in path:
    candidate = path.rsplit(':', 1)[0]
  if os.path.isfile(candidate):
    return None
  where = os.path.abspath(candidate)
  what = 'is a folder, not a file' if os.path.isdir(candidate) else 'does not exist'
  known = available_configs(configs_dir)
  return (f'the config file {candidate} ({where}) {what}. Pass --config=configs/NAME.py; the configs are: '
          f'{", ".join(known) or "none found in " + configs_dir}. See README.md.')


def check_config_file(argv: Sequence[str], flag: str = 'config') -> None:
  """ConfigError if the --FLAG config file given in argv does not exist (nothing if the flag is absent)."""
  problem = config_file_problem(config_flag_value(argv[1:], flag))
  if problem:
    raise ConfigError(problem)


def fail(message: str, status: int = 2) -> None:
  """Prints `error: message` on stderr and exits with `status`."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def make_flags_parser(usage: str):
  """An absl `flags_parser` for `app.run`; `usage` is the hint appended to a flag error."""

  def parse_flags(argv):
    try:
      check_config_file(argv)
    except ConfigError as e:
      fail(str(e))
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f'{e}\n{usage}')
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      detail = e.args[0] if e.args else str(e)
      fail(f'bad --config override or config file: {detail}. Every key a run reads is defined in '
           'configs/default.py; check the spelling and type against it.')

  return parse_flags
