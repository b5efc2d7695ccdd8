"""Small pieces shared by the package's command-line entry points (python -m autolora_jax.compare).

`fail` prints a one-paragraph error and exits (status 2 for bad input); `parse_flags` is an absl
`flags_parser` that turns a missing config file or a bad `--config.KEY=VALUE` override into such an error
instead of a traceback.
"""

from __future__ import annotations

import sys

from absl import flags


def fail(message: str, status: int = 2) -> None:
  """Prints `error: message` on stderr and exits with `status`."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def make_flags_parser(usage: str):
  """An absl `flags_parser` for `app.run`; `usage` is the hint appended to a flag error."""

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f'{e}\n{usage}')
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      detail = e.args[0] if e.args else str(e)
      fail(f'bad --config override or config file: {detail}. Every key a run reads is defined in '
           'configs/default.py; check the spelling and type against it.')

  return parse_flags
