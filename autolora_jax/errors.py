"""Every error type of the package.

Bad input (`InputError` and its kinds) is raised before anything expensive starts, with a one-paragraph
message that says what is wrong and how to fix it; run.py prints the message alone (no traceback) and exits
with status 2. `input_errors()` adds AutoAttack's own `AutoAttackInputError`: autoattack/ is self-contained
(it imports nothing of the rest of the package), so its error type cannot derive from `InputError`.

`NonFiniteLossError` (exit status 1) and `Preempted` (exit status preemption.EXIT_CODE) end a run that
can be resumed from its newest checkpoint.
"""

from typing import Optional


class InputError(ValueError):
  """Bad input from the user; the message says what is wrong and how to fix it."""


class ConfigError(InputError):
  """A config value that is unknown, out of range or inconsistent."""


class DataError(InputError):
  """A data set that is unknown, not prepared or malformed."""


class CheckpointError(InputError):
  """A checkpoint that is missing, unreadable or of the wrong architecture."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint folder that cannot be read (truncated or missing files, undecodable JSON).

  `folder` is the checkpoint's folder, `step` its id (None outside a run's checkpoints), `cause` a one-line
  description of the read error.
  """

  def __init__(self, message: str, *, folder: str, step: Optional[int], cause: str):
    super().__init__(message)
    self.folder, self.step, self.cause = folder, step, cause


class WorkdirError(InputError):
  """A workdir that cannot be written or holds a different run."""


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the message names the epoch and step."""


class Preempted(Exception):
  """The run stopped on request after saving a checkpoint; the message says how to resume."""

  def __init__(self, message: str, *, epoch: int, step: int, checkpoint_step: int):
    super().__init__(message)
    self.epoch, self.step, self.checkpoint_step = epoch, step, checkpoint_step


def input_errors() -> tuple:
  """The exception types that are bad input, for `except input_errors():` in the entry points.

  Imports autoattack (and so JAX) only when called: a flag error stays fast.
  """
  from autolora_jax.autoattack.errors import AutoAttackInputError  # pylint: disable=g-import-not-at-top
  return (InputError, AutoAttackInputError)
