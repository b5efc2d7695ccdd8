"""The command-line bootstrap that every entry point uses (autolora-train = run.py = autolora_jax/main.py,
autolora-compare = python -m autolora_jax.compare, autolora-export = python -m autolora_jax.export).

`run_command(main, usage, module)` is the common start of a command: it parses the flags, sets up logging
and the host (XLA's CPU settings, the persistent compilation cache of --compilation_cache), calls
`main(command)` and turns the package's errors into a one-paragraph message and an exit status: 2 for bad
input, 1 for a non-finite loss, preemption.EXIT_CODE (75) for a preemption.

`fail` prints such a message and exits. `make_flags_parser` is an absl `flags_parser` that first resolves
the --config value (`resolve_config`: a file that exists is used as given; a bare NAME, NAME.py, or
configs/NAME.py where no such file is, means the packaged config autolora_jax/configs/NAME.py, so the
installed commands take `--config=demo` from any folder) and turns a config that is neither
(`check_config_file`, looked at before absl parses the flags: the config loader would otherwise end in a
traceback) or a bad `--config.KEY=VALUE` override into such an error.
"""

from __future__ import annotations

import glob
import logging
import os
import shlex
import shutil
import sys
from typing import Callable, List, Optional, Sequence

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


def define_config_flag():
  """Defines --config (a packaged config by name, or a config file; see `resolve_config`) and returns its
  holder; `load_config` reads it."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return config_flags.DEFINE_config_file(
      'config', None, 'A packaged config by name (demo, cifar10, fashion_mnist, ...: '
      'autolora_jax/configs/NAME.py), or a config file path.', lock_config=True)


def load_config(holder):
  """(config, config file) of a --config flag's holder: a config file that fails to load, or a bad
  override, is a one-paragraph error (exit 2); a missing file was refused before, by `check_config_file`
  in the flags parser."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_file = config_flags.get_config_filename(flags.FLAGS[holder.name])
  try:
    config = holder.value
    config.method  # pylint: disable=pointless-statement (a file that failed to load raises here)
    return config, config_file
  except (OSError, KeyError, AttributeError, TypeError, ValueError) as e:
    detail = ' '.join(str(e.args[0] if e.args else e).split())
    fail(f'the config file {config_file!r} or a --config override could not be used: {detail}. Every key a '
         'run reads is defined in configs/default.py; check the file and the spelling and type of the '
         'overrides against it.')


def command_prefix(argv0: str, module: str) -> List[str]:
  """How this process was started, as the words before the flags of a command that repeats it:
  ['python', 'run.py'] (a script), ['python', '-m', MODULE] (`module`'s file, or its __main__.py for a
  package), or ['autolora-train'] (a console script; its full path where that name on PATH is another
  program or none)."""
  base = os.path.basename(argv0)
  if base.endswith('.py'):
    loaded = sys.modules.get(module)
    origin = getattr(loaded, '__file__', None) or ''
    if origin.endswith('__init__.py'):
      origin = os.path.join(os.path.dirname(origin), '__main__.py')
    if origin and os.path.abspath(argv0) == os.path.abspath(origin):
      return ['python', '-m', module]
    return ['python', argv0]
  found = shutil.which(base)
  if found and os.path.exists(argv0) and os.path.samefile(found, argv0):
    return [base]
  return [argv0]


def command_line(module: str, argv: Optional[Sequence[str]] = None, omit: Sequence[str] = ()) -> str:
  """The shell command that repeats this process's command (`command_prefix` and the flags of `argv`,
  default sys.argv), without the flags that start with one of `omit`."""
  argv = sys.argv if argv is None else argv
  return shlex.join(command_prefix(argv[0], module) + [a for a in argv[1:] if not a.startswith(tuple(omit))])


_HOST_FLAGS = {}


def define_host_flags() -> dict:
  """Defines the flags every command has (once; absl's flags are global): --compilation_cache."""
  if not _HOST_FLAGS:
    _HOST_FLAGS['compilation_cache'] = flags.DEFINE_string(
        'compilation_cache', None, 'Folder of the persistent cache of compiled programs (default: '
        '~/.cache/autolora-jax/xla, or $XDG_CACHE_HOME/autolora-jax/xla); a second run of a config compiles '
        'nothing. Empty: no cache.')
  return _HOST_FLAGS


def set_up(compilation_cache: Optional[str] = None) -> None:
  """Logging (libraries: warnings; this package: progress messages) and the host settings, before the first
  computation: on the CPU, freed memory kept for reuse and XLA's own convolution kernels (both nothing on
  GPU and TPU hosts, see autolora_jax/ops/host.py); the compilation cache in `compilation_cache` (None: the
  default folder; '': none)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from autolora_jax.ops import host  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('autolora_jax').setLevel(logging.INFO)
  host.retain_freed_memory()
  host.set_xla_cpu_flags()
  cache = host.default_compilation_cache_dir() if compilation_cache is None else compilation_cache
  host.enable_compilation_cache(cache)


def run_command(main: Callable[[str], None], usage: str, module: str, *, stopped: str = 'To resume: {command}',
                failed: str = '', omit: Sequence[str] = ()) -> None:
  """Runs a command from sys.argv: its flags (defined beforehand; --compilation_cache here) parsed by
  `make_flags_parser(usage)`, positional arguments refused, `set_up`, then `main(command)`, `command` being
  the shell command that repeats this one (`command_line(module, omit=omit)`).

  Bad input (`errors.input_errors()`) ends with its message and exit status 2; `errors.NonFiniteLossError`
  with its message, `failed` and status 1; `errors.Preempted` with its message, `stopped` and status
  preemption.EXIT_CODE. `failed` and `stopped` may name `{command}`.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (data, TensorBoard) only for errors
  from absl import app  # pylint: disable=g-import-not-at-top
  host_flags = define_host_flags()

  def start(argv):
    if len(argv) > 1:
      fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value.')
    from autolora_jax import errors, preemption  # pylint: disable=g-import-not-at-top
    set_up(host_flags['compilation_cache'].value)
    command = command_line(module, omit=omit)
    try:
      main(command)
    except errors.input_errors() as e:
      fail(str(e))
    except errors.NonFiniteLossError as e:
      fail('\n'.join([str(e)] + ([failed.format(command=command)] if failed else [])), status=1)
    except errors.Preempted as e:
      print(f'{e}\n{stopped.format(command=command)}', file=sys.stderr)
      sys.exit(preemption.EXIT_CODE)

  app.run(start, flags_parser=make_flags_parser(usage))
