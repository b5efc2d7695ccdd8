"""AutoLoRa's automatic loss scalars and validation-driven learning-rate schedule (SPEC.md).

Both are pure functions of numbers; the state lives outside, in a small serialisable dataclass:

    sched = auto_lr()                      # lr0=0.01, window=4, rho=0.75, max_epochs=60, min_lr=1e-5
    state = sched.init()
    for epoch in range(1, ...):
      ...                                   # train one epoch with lr = state.lr
      state, decision = sched.update(state, epoch, robust_acc)
      # decision.new_best: save the best checkpoint; decision.reload_best: reload it;
      # decision.lr: the lr of the next epoch; decision.stop: end training.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Tuple


def auto_scalars(nat_acc: float, l2_max: float = 6.0) -> Tuple[float, float]:
  """Loss scalars from the natural branch's clean validation accuracy a in [0, 1]: (1 - a, l2_max * a)."""
  if not 0.0 <= nat_acc <= 1.0:
    raise ValueError(f'nat_acc is an accuracy in [0, 1], got {nat_acc}.')
  return 1.0 - nat_acc, l2_max * nat_acc


@dataclasses.dataclass(frozen=True)
class AutoLRState:
  """State of the learning-rate state machine; `to_dict`/`from_dict` give its JSON form.

  Attributes:
    lr: the learning rate of the next epoch.
    history: validation robust accuracy r_1, ..., r_e of the epochs so far.
    best: the best robust accuracy so far (-1 before the first epoch).
    best_epoch: the epoch that reached `best` (0 before the first epoch).
    window_index: index i of the next window checkpoint W[i].
    best_at_checkpoint: `best` as it was at the previous window checkpoint.
    halved_at_checkpoint: whether the lr was halved at the previous window checkpoint.
  """
  lr: float
  history: Tuple[float, ...] = ()
  best: float = -1.0
  best_epoch: int = 0
  window_index: int = 1
  best_at_checkpoint: float = -1.0
  halved_at_checkpoint: bool = False

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), 'history': list(self.history)}

  @classmethod
  def from_dict(cls, d: dict) -> 'AutoLRState':
    return cls(**{**d, 'history': tuple(float(r) for r in d['history'])})


class LRDecision(NamedTuple):
  """What the host does after an epoch.

  Attributes:
    lr: learning rate from the next epoch on.
    new_best: this epoch's robust accuracy beat every earlier one (save the best checkpoint).
    reload_best: reload the best checkpoint's parameters and BN statistics (the optimizer state stays).
    stop: training ends after this epoch (lr < min_lr or max_epochs reached).
    condition: 0 when the lr was not halved, else the scheduler condition (1 or 2) that halved it.
  """
  lr: float
  new_best: bool
  reload_best: bool
  stop: bool
  condition: int


class AutoLR(NamedTuple):
  """An (init, update) pair, in the style of optax's GradientTransformation."""
  init: Callable[[], AutoLRState]
  update: Callable[[AutoLRState, int, float], Tuple[AutoLRState, LRDecision]]
  checkpoints: Tuple[int, ...]


def auto_lr(lr0: float = 0.01, window: int = 4, rho: float = 0.75, max_epochs: int = 60,
            min_lr: float = 1e-5, condition2: str = 'paper') -> AutoLR:
  """The validation-based learning-rate schedule of SPEC.md ("Automatic learning rate").

  Window checkpoints W = [0, window, 2 * window, ...] below max_epochs. After epoch e (1-based) with
  e - 1 == W[i], with n = W[i] - W[i-1] and `count` the rises r_{j+1} > r_j over the n epoch pairs that end
  at e, the lr is halved and the best checkpoint reloaded if
    1. count < rho * n, or
    2. the lr was not halved at the previous checkpoint and the best robust accuracy has not improved
       since the previous checkpoint.
  Training stops once the lr falls below min_lr or after max_epochs.

  Args:
    condition2: 'paper' as above; 'reference' drops the "not halved at the previous checkpoint" clause
      and never fires at the first checkpoint, as the authors' public code does (SPEC.md difference 3).
  """
  if condition2 not in ('paper', 'reference'):
    raise ValueError(f"condition2 must be 'paper' or 'reference', got {condition2!r}.")
  if window < 1 or max_epochs < 1 or lr0 <= 0 or not 0 < rho <= 1:
    raise ValueError(f'auto_lr needs window >= 1, max_epochs >= 1, lr0 > 0 and 0 < rho <= 1; got '
                     f'window={window}, max_epochs={max_epochs}, lr0={lr0}, rho={rho}.')
  checkpoints = tuple(range(0, max_epochs, window))

  def init() -> AutoLRState:
    return AutoLRState(lr=float(lr0))

  def update(state: AutoLRState, epoch: int, robust_acc: float) -> Tuple[AutoLRState, LRDecision]:
    if epoch != len(state.history) + 1:
      raise ValueError(f'auto_lr.update expects epoch {len(state.history) + 1} next, got {epoch}.')
    history = state.history + (float(robust_acc),)
    new_best = history[-1] > state.best
    best, best_epoch = (history[-1], epoch) if new_best else (state.best, state.best_epoch)
    lr, condition = state.lr, 0
    i = state.window_index
    at_checkpoint = i < len(checkpoints) and epoch - 1 == checkpoints[i]
    if at_checkpoint:
      n = checkpoints[i] - checkpoints[i - 1]
      # history[k] is r_{k+1}: the n pairs (r_{e-n}, r_{e-n+1}), ..., (r_{e-1}, r_e).
      count = sum(history[j + 1] > history[j] for j in range(epoch - 1 - n, epoch - 1))
      not_improved = best <= state.best_at_checkpoint
      if condition2 == 'paper':
        cond2 = not state.halved_at_checkpoint and not_improved
      else:
        cond2 = i > 1 and not_improved
      if count < rho * n:
        condition = 1
      elif cond2:
        condition = 2
      if condition:
        lr = lr / 2
    new_state = dataclasses.replace(
        state, lr=lr, history=history, best=best, best_epoch=best_epoch,
        window_index=i + 1 if at_checkpoint else i,
        best_at_checkpoint=best if at_checkpoint else state.best_at_checkpoint,
        halved_at_checkpoint=bool(condition) if at_checkpoint else state.halved_at_checkpoint)
    stop = lr < min_lr or epoch >= max_epochs
    return new_state, LRDecision(lr=lr, new_best=new_best, reload_best=bool(condition), stop=stop,
                                 condition=condition)

  return AutoLR(init=init, update=update, checkpoints=checkpoints)
