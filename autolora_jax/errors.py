"""Errors for bad input (config values, paths, checkpoints, data).

Each is raised before anything expensive starts, with a one-paragraph message that says what is wrong
and how to fix it; run.py prints the message alone (no traceback) and exits with status 2.
"""


class InputError(ValueError):
  """Bad input from the user; the message says what is wrong and how to fix it."""


class ConfigError(InputError):
  """A config value that is unknown, out of range or inconsistent."""


class DataError(InputError):
  """A data set that is unknown, not prepared or malformed."""


class CheckpointError(InputError):
  """A checkpoint that is missing, unreadable or of the wrong architecture."""


class WorkdirError(InputError):
  """A workdir that cannot be written or holds a different run."""
