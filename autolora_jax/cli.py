"""Small pieces shared by the command-line entry points (autolora-train = run.py = autolora_jax/main.py,
autolora-compare = python -m autolora_jax.compare).

`fail` prints a one-paragraph error and exits (status 2 for bad input). `make_flags_parser` is an absl
`flags_parser` that first resolves the --config value (`resolve_config`: a file that exists is used as
given; a bare NAME, NAME.py, or configs/NAME.py where no such file is, means the packaged config
autolora_jax/configs/NAME.py, so the installed commands take `--config=demo` from any folder) and turns a
config that is neither (`check_config_file`, looked at before absl parses the flags: the config loader would
otherwise end in a traceback) or a bad `--config.KEY=VALUE` override into such an error.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import List, Optional, Sequence

from absl import flags

from autolora_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The packaged configs (autolora_jax/configs; in a checkout, configs/ at the root links to it).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
CONFIG_HINT = ('Pass --config=NAME for a packaged config ({names}), or --config=PATH/TO/FILE.py for a '
               'config file of your own (in a checkout: --config=configs/NAME.py)')


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


def available_configs(configs_dir: str = CONFIGS_DIR) -> List[str]:
  """The names of the packaged configs (autolora_jax/configs/NAME.py) an entry point takes as --config=NAME."""
  return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(configs_dir, '*.py'))
                if not p.endswith('__init__.py'))


def _split_argument(value: str):
  """(path, suffix) of a --config value: a `PATH:ARGUMENT` value (a config file's optional argument) is
  split unless the whole value is a file; the suffix is '' or ':ARGUMENT'."""
  if not os.path.isfile(value) and ':' in value:
    path = value.rsplit(':', 1)[0]
    return path, value[len(path):]
  return value, ''


def _packaged_name(path: str) -> Optional[str]:
  """NAME if `path` names a packaged config by the forms resolve_config takes: NAME, NAME.py or
  configs/NAME.py (relative); otherwise None."""
  if not path:
    return None
  norm = os.path.normpath(path)
  folder, base = os.path.split(norm)
  if folder not in ('', 'configs'):
    return None
  name = base[:-3] if base.endswith('.py') else base
  if folder == 'configs' and not base.endswith('.py'):
    return None
  return name or None


def resolve_config(value: Optional[str], configs_dir: str = CONFIGS_DIR) -> Optional[str]:
  """The config file path that a --config value stands for (its `:ARGUMENT` suffix kept); None if none.

  A file that exists is used as given (a config of your own anywhere, or configs/NAME.py in a checkout).
  Otherwise a bare NAME (no '/'), NAME.py, or configs/NAME.py means the packaged config
  `configs_dir`/NAME.py, so `--config=demo` works from any folder and the README's `--config=configs/demo.py`
  works after `pip install` too (a folder of that name, e.g. a workdir `demo`, is no config and is passed
  over).
  """
  if value is None:
    return None
  path, suffix = _split_argument(value)
  if os.path.isfile(path):
    return value
  name = _packaged_name(path)
  if name is not None and name in available_configs(configs_dir):
    return os.path.join(configs_dir, name + '.py') + suffix
  return None


def config_file_problem(path: str, configs_dir: str = CONFIGS_DIR) -> Optional[str]:
  """A one-paragraph message if the --config value `path` is neither a file nor a packaged config (see
  `resolve_config`); None if it resolves."""
  if path is None or resolve_config(path, configs_dir) is not None:
    return None
  candidate, _ = _split_argument(path)
  where = os.path.abspath(candidate)
  what = 'is a folder, not a file' if os.path.isdir(candidate) else 'does not exist'
  name = _packaged_name(candidate)
  if name is not None:
    what += f', and no packaged config is named {name}'
  known = available_configs(configs_dir)
  names = ', '.join(known) or 'none found in ' + configs_dir
  return f'the config file {candidate} ({where}) {what}. {CONFIG_HINT.format(names=names)}. See README.md.'


def resolve_config_argv(argv: Sequence[str], flag: str = 'config',
                        configs_dir: str = CONFIGS_DIR) -> List[str]:
  """argv with every --FLAG=VALUE (or --FLAG VALUE) value replaced by its `resolve_config` path; a value
  that does not resolve is left as it is (`check_config_file` reports the one that counts)."""
  out = list(argv)
  for i, arg in enumerate(out):
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{flag}='):
        resolved = resolve_config(arg[len(dashes) + len(flag) + 1:], configs_dir)
        if resolved is not None:
          out[i] = f'{dashes}{flag}={resolved}'
      elif arg == f'{dashes}{flag}' and i + 1 < len(out):
        resolved = resolve_config(out[i + 1], configs_dir)
        if resolved is not None:
          out[i + 1] = resolved
  return out


def check_config_file(argv: Sequence[str], flag: str = 'config') -> None:
  """ConfigError if the --FLAG config given in argv is neither a file nor a packaged config (nothing if the
  flag is absent)."""
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
    argv = [argv[0]] + resolve_config_argv(argv[1:])  # --config=demo: the packaged demo.py
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f'{e}\n{usage}')
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      detail = e.args[0] if e.args else str(e)
      fail(f'bad --config override or config file: {detail}. Every key a run reads is defined in '
           'autolora_jax/configs/default.py (configs/default.py in a checkout); check the spelling and type '
           'against it.')

  return parse_flags
