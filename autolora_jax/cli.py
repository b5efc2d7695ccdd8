"""Small checks shared by the command-line entry points (run.py, python -m autolora_jax.compare, ...).

`check_config_file(argv)` looks at the --config=PATH flag before absl parses it: a config file that does
not exist would otherwise end in a traceback from the config loader. It raises `errors.ConfigError` with one
paragraph naming the file and the configs that do exist; the entry point prints it and exits with status 2.
"""

from __future__ import annotations

import glob
import os
from typing import Optional, Sequence

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
