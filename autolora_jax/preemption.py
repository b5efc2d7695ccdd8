"""Preemption: SIGTERM or SIGINT stops a run after the step it is in, with a checkpoint to resume from.

`Guard` turns the signal into a stop request that the training loop polls after every step
(`should_stop(position_id)`). The loop then saves the state with its position inside the epoch (and the
epoch's running metric sums) and raises `errors.Preempted`, whose message says how to resume; run.py
prints it and exits with status `EXIT_CODE`. Starting the same command again resumes at that exact step:
the data order and every random draw are functions of (seed, epoch, step), so the run ends as an
uninterrupted one.

Multi-process runs must all stop after the same step (the checkpoint is saved collectively). There the
notice goes through JAX's preemption service (`jax.distributed.initialize()` installs its SIGTERM handler,
which tells every process), and `should_stop` is true on every process at the same, agreed position
(`multihost_utils.reached_preemption_sync_point`). SIGINT (Ctrl-C) is forwarded to it as a SIGTERM.
A second SIGINT interrupts at once (KeyboardInterrupt), without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

import jax

log = logging.getLogger(__name__)

EXIT_CODE = 75  # "temporary failure, try again" (sysexits.h EX_TEMPFAIL): a scheduler may requeue the job


def position_id(epoch: int, done_steps: int, steps_per_epoch: int) -> int:
  """A number that grows with the run's progress, the same on every process.

  epoch is 1-based; done_steps in 1..steps_per_epoch counts the train steps finished in the epoch, and
  steps_per_epoch + 1 marks the end of the epoch (after validation and the epoch's checkpoint).
  """
  return (epoch - 1) * (steps_per_epoch + 2) + done_steps


class Guard:
  """While entered (`with Guard() as guard:`), SIGTERM and SIGINT request a stop instead of killing.

  Handlers can only be installed from the main thread; elsewhere the guard is inert (signals keep their
  usual effect). Leaving the `with` block restores the previous handlers.
  """

  def __init__(self, multiprocess: Optional[bool] = None):
    self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess
    self.signal_name: Optional[str] = None  # the signal that asked to stop (local to this process)
    self.position: Optional[int] = None  # the last position `should_stop` was called at (None: not yet)
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.signal_name == 'SIGINT':
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    first = self.signal_name is None
    self.signal_name = self.signal_name or name
    if first:
      log.warning('%s received: finishing the current step (in the test: AutoAttack batch), then saving a '
                  'checkpoint to resume from (Ctrl-C again to stop at once, without one).', name)
    if self.multiprocess and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service owns SIGTERM and tells all processes

  def __enter__(self) -> 'Guard':
    if threading.current_thread() is not threading.main_thread():
      log.warning('Not in the main thread: SIGTERM/SIGINT will not save a checkpoint before stopping.')
      return self
    # In a multi-process run SIGTERM stays with JAX's preemption service.
    signums = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def should_stop(self, position: int) -> bool:
    """True when the run should stop here; `position` (see `position_id`) must grow from call to call.

    Multi-process: true on all processes at the same position, chosen after a notice reached any of
    them; call it at every position, in the same order on every process. JAX's service stops at the
    position after the highest one any process had reached when the notice came, so positions must go up
    by one from call to call (a gap there is a position nobody stops at); code that checks after the
    training (evaluation.test) goes on from `position` + 1.
    """
    self.position = position
    if not self.multiprocess:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      stop = multihost_utils.reached_preemption_sync_point(position)
    except RuntimeError as e:  # the preemption service is off (jax_enable_preemption_service=False)
      if not getattr(self, '_warned', False):
        log.warning('Preemption notices are not handled in this multi-process run: %s', e)
        self._warned = True
      return False
    if stop and self.signal_name is None:
      self.signal_name = 'a preemption notice'
    return stop
