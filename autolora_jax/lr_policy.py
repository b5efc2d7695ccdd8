"""The epoch policy of a run, one interface for every method: the learning rate and loss scalars of the
next epoch, whether to save or reload the best checkpoint, and when to stop.

    policy = lr_policy.create(config)
    pstate, plan = policy.start(measured)             # before epoch 1
    for epoch in 1, 2, ...:
      ...                                              # train one epoch with plan.lr, plan.l1, plan.l2
      pstate, plan = policy.update(pstate, epoch, measured)
      # plan.new_best: save the best checkpoint; plan.reload_best: reload it (params and BN statistics);
      # plan.lr, plan.l1, plan.l2: the next epoch's; plan.stop: end training.

`measured` holds the validation accuracies (fractions) of the model just trained: 'pgd' (PGD-10 of the
adversarial branch; not needed by `start`), 'clean_nat' (clean, natural branch) and, when
`policy.needs_train_accuracy`, 'train_split_clean_nat' (natural branch, augmented training split).
The policy is a pure function of these numbers; its state `PolicyState` is JSON-serialisable (`to_dict`,
`from_dict`) and goes into the 'latest' checkpoint so that a resumed run continues it.

* `AutoPolicy` (AutoLoRa): SPEC.md's automatic learning rate (`schedule.auto_lr`) and scalars
  (`schedule.auto_scalars`).
* `FixedPolicy` (vanilla RFT, PGD-AT): fixed l1, l2 and an optax schedule over epochs; the best
  checkpoint (by validation PGD-10) is kept but never reloaded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import optax

from autolora_jax import schedule


class Plan(NamedTuple):
  """What the loop does after an epoch (or before the first one).

  Attributes:
    lr, l1, l2: the learning rate and loss scalars of the next epoch.
    new_best: the epoch's validation PGD-10 accuracy beat every earlier one: save the best checkpoint.
    reload_best: reload the best checkpoint's parameters and BN statistics (the optimizer state stays).
    stop: training ends after this epoch.
    condition: 0, or the scheduler condition (1 or 2) that halved the lr (AutoPolicy only).
    best_epoch: the epoch of the best checkpoint (0 before any).
  """
  lr: float
  l1: float
  l2: float
  new_best: bool = False
  reload_best: bool = False
  stop: bool = False
  condition: int = 0
  best_epoch: int = 0


@dataclasses.dataclass(frozen=True)
class PolicyState:
  """The policy's state after the epochs so far.

  Attributes:
    lr, l1, l2: the next epoch's learning rate and loss scalars.
    best: the best validation PGD-10 accuracy so far (-1 before the first epoch).
    best_epoch: the epoch that reached it (0 before the first epoch).
    best_nat_acc: the natural branch's validation clean accuracy of the best checkpoint (NaN before one).
    auto: the automatic learning rate's `schedule.AutoLRState.to_dict()` (AutoPolicy only).
  """
  lr: float
  l1: float
  l2: float
  best: float = -1.0
  best_epoch: int = 0
  best_nat_acc: float = math.nan
  auto: Optional[dict] = None

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['best_nat_acc'] = None if math.isnan(self.best_nat_acc) else self.best_nat_acc  # valid JSON
    return d

  @classmethod
  def from_dict(cls, d: dict) -> 'PolicyState':
    d = dict(d)
    d['best_nat_acc'] = math.nan if d.get('best_nat_acc') is None else float(d['best_nat_acc'])
    return cls(**d)


def _plan(state: PolicyState, **kwargs) -> Plan:
  return Plan(lr=state.lr, l1=state.l1, l2=state.l2, best_epoch=state.best_epoch, **kwargs)


class AutoPolicy:
  """AutoLoRa: the automatic learning rate and loss scalars of SPEC.md.

  Args:
    auto_lr: the learning-rate state machine (`schedule.auto_lr(...)`).
    l2_max: l2 = l2_max * a.
    scalar_source: 'validation' (the paper): a is the natural branch's clean validation accuracy of the
      model the next epoch trains, i.e. of the best checkpoint after a reload. 'train' (reference_compat,
      item 2): a is measured on the training split with training augmentation, on the model as the
      epoch left it, and is not recomputed after a reload.
  """

  def __init__(self, auto_lr: schedule.AutoLR, l2_max: float = 6.0, scalar_source: str = 'validation'):
    if scalar_source not in ('validation', 'train'):
      raise ValueError(f"scalar_source must be 'validation' or 'train', got {scalar_source!r}.")
    self.auto_lr = auto_lr
    self.l2_max = l2_max
    self.scalar_source = scalar_source
    self.needs_train_accuracy = scalar_source == 'train'

  def _accuracy(self, measured: dict) -> float:
    # Item 2 (reference_compat): the training split's accuracy instead of the validation split's.
    return measured['train_split_clean_nat' if self.scalar_source == 'train' else 'clean_nat']

  def start(self, measured: dict) -> Tuple[PolicyState, Plan]:
    lr_state = self.auto_lr.init()
    l1, l2 = schedule.auto_scalars(self._accuracy(measured), self.l2_max)
    state = PolicyState(lr=lr_state.lr, l1=l1, l2=l2, auto=lr_state.to_dict())
    return state, _plan(state)

  def update(self, state: PolicyState, epoch: int, measured: dict) -> Tuple[PolicyState, Plan]:
    lr_state, d = self.auto_lr.update(schedule.AutoLRState.from_dict(state.auto), epoch, measured['pgd'])
    best_nat_acc = measured['clean_nat'] if d.new_best else state.best_nat_acc
    if self.scalar_source == 'train':
      a = self._accuracy(measured)  # item 2: the epoch's own model, kept after a reload
    else:
      a = best_nat_acc if d.reload_best else measured['clean_nat']  # the model the next epoch trains
    l1, l2 = schedule.auto_scalars(a, self.l2_max)
    state = PolicyState(lr=d.lr, l1=l1, l2=l2, best=lr_state.best, best_epoch=lr_state.best_epoch,
                        best_nat_acc=best_nat_acc, auto=lr_state.to_dict())
    return state, _plan(state, new_best=d.new_best, reload_best=d.reload_best, stop=d.stop,
                        condition=d.condition)


class FixedPolicy:
  """Vanilla RFT and PGD-AT: fixed l1 and l2, and the learning rate `lr_fn(k)` in epoch k + 1.

  The best checkpoint (by validation PGD-10 accuracy) is kept, never reloaded; training stops after
  `epochs` epochs.
  """
  needs_train_accuracy = False

  def __init__(self, lr_fn: Callable[[int], float], epochs: int, l1: float, l2: float):
    self.lr_fn = lr_fn
    self.epochs = epochs
    self.l1, self.l2 = float(l1), float(l2)

  def _lr(self, epochs_done: int) -> float:
    # optax computes in float32: keep that value, as its shortest decimal (0.001, not 0.0010000000475).
    return float(str(np.float32(self.lr_fn(epochs_done))))

  def start(self, measured: Optional[dict] = None) -> Tuple[PolicyState, Plan]:
    del measured  # the scalars are fixed
    state = PolicyState(lr=self._lr(0), l1=self.l1, l2=self.l2)
    return state, _plan(state)

  def update(self, state: PolicyState, epoch: int, measured: dict) -> Tuple[PolicyState, Plan]:
    new_best = measured['pgd'] > state.best
    state = dataclasses.replace(
        state, lr=self._lr(epoch),
        best=measured['pgd'] if new_best else state.best, best_epoch=epoch if new_best else state.best_epoch,
        best_nat_acc=measured['clean_nat'] if new_best else state.best_nat_acc)
    return state, _plan(state, new_best=bool(new_best), stop=epoch >= self.epochs)


def fixed_lr_schedule(fixed) -> optax.Schedule:
  """The optax schedule of `config.fixed`, over the 0-based epoch index (the lr is constant in an epoch).

  'constant': fixed.lr. 'piecewise': fixed.lr times fixed.decay for each boundary b <= index, i.e. the
  lr is multiplied by decay after b epochs. 'cosine': fixed.lr * (1 + cos(pi * index / epochs)) / 2.
  """
  if fixed.lr_schedule == 'constant':
    return optax.constant_schedule(fixed.lr)
  if fixed.lr_schedule == 'piecewise':
    return optax.piecewise_constant_schedule(fixed.lr, {int(b): fixed.decay for b in fixed.boundaries})
  if fixed.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(fixed.lr, decay_steps=fixed.epochs)
  raise ValueError(f"fixed.lr_schedule must be 'constant', 'piecewise' or 'cosine', got "
                   f'{fixed.lr_schedule!r}.')


def auto_lr_schedule(config) -> schedule.AutoLR:
  """The automatic learning rate of `config.auto_lr`."""
  s = config.auto_lr
  # Item 3 (reference_compat): the public code's condition 2, "the best has not improved since the
  # previous checkpoint", which never fires at the first checkpoint.
  return schedule.auto_lr(lr0=s.lr0, window=s.window, rho=s.rho, max_epochs=s.max_epochs, min_lr=s.min_lr,
                          condition2='reference' if config.reference_compat else 'paper')


def create(config):
  """The policy of `config.method`: AutoPolicy for 'autolora', FixedPolicy for the baselines."""
  if config.method == 'autolora':
    return AutoPolicy(auto_lr_schedule(config), config.auto_scalars.l2_max,
                      scalar_source='train' if config.reference_compat else 'validation')  # item 2
  f = config.fixed
  l1, l2 = (0.0, 0.0) if config.method == 'pgd_at' else (f.l1, f.l2)  # PGD-AT: l1 = l2 = 0
  return FixedPolicy(fixed_lr_schedule(f), f.epochs, l1, l2)
