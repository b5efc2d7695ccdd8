"""The epoch policy: after each epoch, the next epoch's learning rate and loss scalars, whether to save or
reload the best checkpoint, and when to stop (docs/method.md, "Automatic loss scalars", "Automatic learning rate").

Every policy is an (init, update) pair of pure functions of numbers, in optax's shape, with one state type
(`PolicyState`, a NamedTuple; `to_dict` / `from_dict` give its JSON form for checkpoints) and one decision
type (`Decision`):

    policy = autolora_policy(auto_lr(lr0=0.01, window=4, rho=0.75, max_epochs=60))   # or fixed_policy(...)
    state, decision = policy.init(measured)          # before epoch 1: decision.lr, .l1, .l2
    for epoch in 1, 2, ...:
      ...                                             # train one epoch with decision.lr, .l1, .l2
      state, decision = policy.update(state, epoch, measured)
      # decision.new_best: save the best checkpoint; decision.reload_best: reload it (params and BN
      # statistics); decision.lr, .l1, .l2: the next epoch's; decision.stop: end training.

`measured` holds validation accuracies (fractions) of the model just trained: 'pgd' (PGD-10 of the
adversarial branch; not read by `init`), 'clean_nat' (clean, natural branch) and, when
`policy.needs_train_accuracy`, 'train_split_clean_nat' (natural branch on the augmented training split).

* `auto_scalars`: l1 = 1 - a, l2 = l2_max * a from the natural branch's clean accuracy a.
* `auto_lr`: the validation-driven learning-rate state machine alone; its update takes the robust accuracy.
* `autolora_policy`: AutoLoRa, `auto_lr` plus `auto_scalars`.
* `fixed_policy`: vanilla RFT and PGD-AT, fixed l1 and l2 and an optax schedule over epochs; the best
  checkpoint (by validation PGD-10) is kept but never reloaded.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import optax

CONDITION2 = ('paper', 'reference')
SCALAR_SOURCES = ('validation', 'train')


def auto_scalars(nat_acc: float, l2_max: float = 6.0) -> Tuple[float, float]:
  """Loss scalars from the natural branch's clean validation accuracy a in [0, 1]: (1 - a, l2_max * a)."""
  if not 0.0 <= nat_acc <= 1.0:
    raise ValueError(f'nat_acc is an accuracy in [0, 1], got {nat_acc}.')
  return 1.0 - nat_acc, l2_max * nat_acc


class PolicyState(NamedTuple):
  """The state of every policy after the epochs so far (JSON form: `to_dict`, `from_dict`).

  Attributes:
    lr, l1, l2: the next epoch's learning rate and loss scalars.
    history: validation PGD-10 accuracy r_1, ..., r_e of the epochs so far.
    best: the best of them (-1 before the first epoch); best_epoch: its epoch (0 before the first).
    best_nat_acc: the natural branch's validation clean accuracy at best_epoch (NaN before it).
    window_index: index i of the next window boundary W[i] of `auto_lr`.
    best_at_window: `best` as it was at the previous window boundary.
    halved_at_window: whether the lr was halved at the previous window boundary.
  """
  lr: float
  l1: float = 0.0
  l2: float = 0.0
  history: Tuple[float, ...] = ()
  best: float = -1.0
  best_epoch: int = 0
  best_nat_acc: float = math.nan
  window_index: int = 1
  best_at_window: float = -1.0
  halved_at_window: bool = False


class Decision(NamedTuple):
  """What the loop does after an epoch (or before the first one).

  Attributes:
    lr, l1, l2: the learning rate and loss scalars from the next epoch on.
    new_best: this epoch's validation PGD-10 accuracy beat every earlier one: save the best checkpoint.
    reload_best: reload the best checkpoint's parameters and BN statistics (the optimizer state stays).
    stop: training ends after this epoch.
    condition: 0, or the `auto_lr` condition (1 or 2) that halved the lr.
    best_epoch: the epoch of the best checkpoint (0 before any).
  """
  lr: float
  l1: float = 0.0
  l2: float = 0.0
  new_best: bool = False
  reload_best: bool = False
  stop: bool = False
  condition: int = 0
  best_epoch: int = 0


class AutoLR(NamedTuple):
  """`auto_lr`'s (init, update) pair; `windows` are its window boundaries W."""
  init: Callable[[], PolicyState]
  update: Callable[[PolicyState, int, float], Tuple[PolicyState, Decision]]
  windows: Tuple[int, ...]


class EpochPolicy(NamedTuple):
  """A run's policy: init(measured) and update(state, epoch, measured), both -> (PolicyState, Decision)."""
  init: Callable[[Optional[dict]], Tuple[PolicyState, Decision]]
  update: Callable[[PolicyState, int, dict], Tuple[PolicyState, Decision]]
  needs_train_accuracy: bool = False


def to_dict(state: PolicyState) -> dict:
  """The state as JSON data (NaN as None)."""
  d = state._asdict()
  d['history'] = list(state.history)
  d['best_nat_acc'] = None if math.isnan(state.best_nat_acc) else state.best_nat_acc
  return d


def from_dict(d: dict) -> PolicyState:
  """The inverse of `to_dict` (checkpoints of other versions: `compat.upgrade_checkpoint_meta` first)."""
  d = dict(d)
  d['history'] = tuple(float(r) for r in d.get('history', ()))
  d['best_nat_acc'] = math.nan if d.get('best_nat_acc') is None else float(d['best_nat_acc'])
  return PolicyState(**d)


def _decision(state: PolicyState, **kwargs) -> Decision:
  return Decision(lr=state.lr, l1=state.l1, l2=state.l2, best_epoch=state.best_epoch, **kwargs)


def _track_best(state: PolicyState, epoch: int, measured: dict) -> Tuple[PolicyState, bool]:
  """Appends the epoch's validation PGD-10 to the history and updates the best (strictly higher wins)."""
  robust = float(measured['pgd'])
  new_best = robust > state.best
  state = state._replace(history=state.history + (robust,))
  if new_best:
    state = state._replace(best=robust, best_epoch=epoch)
    if 'clean_nat' in measured:
      state = state._replace(best_nat_acc=float(measured['clean_nat']))
  return state, bool(new_best)


def auto_lr(lr0: float = 0.01, window: int = 4, rho: float = 0.75, max_epochs: int = 60,
            min_lr: float = 1e-5, condition2: str = 'paper') -> AutoLR:
  """The validation-based learning-rate schedule of docs/method.md ("Automatic learning rate").

  Window boundaries W = [0, window, 2 * window, ...] below max_epochs. After epoch e (1-based) with
  e - 1 == W[i], with n = W[i] - W[i-1] and `count` the rises r_{j+1} > r_j over the n epoch pairs that end
  at e, the lr is halved and the best checkpoint reloaded if
    1. count < rho * n, or
    2. the lr was not halved at the previous boundary and the best robust accuracy has not improved
       since the previous boundary.
  Training stops once the lr falls below min_lr or after max_epochs.

  `update(state, epoch, robust_acc)` takes the epoch's validation PGD-10 accuracy; l1 and l2 pass through.

  Args:
    condition2: 'paper' as above; 'reference' drops the "not halved at the previous boundary" clause
      and never fires at the first boundary, as the authors' public code does (docs/method.md difference 3).
  """
  if condition2 not in CONDITION2:
    raise ValueError(f"condition2 must be 'paper' or 'reference', got {condition2!r}.")
  if window < 1 or max_epochs < 1 or lr0 <= 0 or not 0 < rho <= 1:
    raise ValueError(f'auto_lr needs window >= 1, max_epochs >= 1, lr0 > 0 and 0 < rho <= 1; got '
                     f'window={window}, max_epochs={max_epochs}, lr0={lr0}, rho={rho}.')
  windows = tuple(range(0, max_epochs, window))

  def init() -> PolicyState:
    return PolicyState(lr=float(lr0))

  def update(state: PolicyState, epoch: int, robust_acc: float) -> Tuple[PolicyState, Decision]:
    if epoch != len(state.history) + 1:
      raise ValueError(f'auto_lr.update expects epoch {len(state.history) + 1} next, got {epoch}.')
    state, new_best = _track_best(state, epoch, {'pgd': robust_acc})
    history, lr, condition = state.history, state.lr, 0
    i = state.window_index
    at_window = i < len(windows) and epoch - 1 == windows[i]
    if at_window:
      n = windows[i] - windows[i - 1]
      # history[k] is r_{k+1}: the n pairs (r_{e-n}, r_{e-n+1}), ..., (r_{e-1}, r_e).
      count = sum(history[j + 1] > history[j] for j in range(epoch - 1 - n, epoch - 1))
      not_improved = state.best <= state.best_at_window
      cond2 = (not state.halved_at_window if condition2 == 'paper' else i > 1) and not_improved
      if count < rho * n:
        condition = 1
      elif cond2:
        condition = 2
      if condition:
        lr = lr / 2
      state = state._replace(window_index=i + 1, best_at_window=state.best, halved_at_window=bool(condition))
    state = state._replace(lr=lr)
    return state, _decision(state, new_best=new_best, reload_best=bool(condition),
                            stop=lr < min_lr or epoch >= max_epochs, condition=condition)

  return AutoLR(init=init, update=update, windows=windows)


def autolora_policy(lr: AutoLR, l2_max: float = 6.0, scalar_source: str = 'validation') -> EpochPolicy:
  """AutoLoRa: the automatic learning rate `lr` (an `auto_lr(...)`) and the automatic loss scalars.

  Args:
    l2_max: l2 = l2_max * a.
    scalar_source: 'validation' (the paper): a is the natural branch's clean validation accuracy of the
      model the next epoch trains, i.e. of the best checkpoint after a reload. 'train' (reference_compat,
      item 2): a is measured on the training split with training augmentation, on the model as the
      epoch left it, and is not recomputed after a reload.
  """
  if scalar_source not in SCALAR_SOURCES:
    raise ValueError(f"scalar_source must be 'validation' or 'train', got {scalar_source!r}.")
  key = 'train_split_clean_nat' if scalar_source == 'train' else 'clean_nat'  # item 2

  def init(measured: dict) -> Tuple[PolicyState, Decision]:
    l1, l2 = auto_scalars(measured[key], l2_max)
    state = lr.init()._replace(l1=l1, l2=l2)
    return state, _decision(state)

  def update(state: PolicyState, epoch: int, measured: dict) -> Tuple[PolicyState, Decision]:
    state, d = lr.update(state, epoch, measured['pgd'])
    if d.new_best:
      state = state._replace(best_nat_acc=float(measured['clean_nat']))
    if scalar_source == 'train':
      a = measured[key]  # item 2: the epoch's own model, kept after a reload
    else:
      a = state.best_nat_acc if d.reload_best else measured['clean_nat']  # the model the next epoch trains
    l1, l2 = auto_scalars(a, l2_max)
    state = state._replace(l1=l1, l2=l2)
    return state, d._replace(l1=l1, l2=l2)

  return EpochPolicy(init=init, update=update, needs_train_accuracy=scalar_source == 'train')


def fixed_policy(lr_schedule: optax.Schedule, epochs: int, l1: float, l2: float) -> EpochPolicy:
  """Vanilla RFT and PGD-AT: fixed l1 and l2, the learning rate `lr_schedule(k)` in epoch k + 1, the best
  checkpoint (by validation PGD-10) kept but never reloaded, a stop after `epochs` epochs."""
  l1, l2 = float(l1), float(l2)

  def lr_after(epochs_done: int) -> float:
    # optax computes in float32: keep that value, as its shortest decimal (0.001, not 0.0010000000475).
    return float(str(np.float32(lr_schedule(epochs_done))))

  def init(measured: Optional[dict] = None) -> Tuple[PolicyState, Decision]:
    del measured  # the scalars are fixed
    state = PolicyState(lr=lr_after(0), l1=l1, l2=l2)
    return state, _decision(state)

  def update(state: PolicyState, epoch: int, measured: dict) -> Tuple[PolicyState, Decision]:
    state, new_best = _track_best(state, epoch, measured)
    state = state._replace(lr=lr_after(epoch))
    return state, _decision(state, new_best=new_best, stop=epoch >= epochs)

  return EpochPolicy(init=init, update=update)


def fixed_lr_schedule(name: str, lr: float, epochs: int, boundaries=(), decay: float = 0.1) -> optax.Schedule:
  """The optax schedule of the baselines, over the 0-based epoch index (the lr is constant in an epoch).

  'constant': lr. 'piecewise': lr times decay for each boundary b <= index, i.e. the lr is multiplied by
  decay after b epochs. 'cosine': lr * (1 + cos(pi * index / epochs)) / 2.
  """
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'piecewise':
    return optax.piecewise_constant_schedule(lr, {int(b): decay for b in boundaries})
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=epochs)
  raise ValueError(f"lr_schedule must be 'constant', 'piecewise' or 'cosine', got {name!r}.")
