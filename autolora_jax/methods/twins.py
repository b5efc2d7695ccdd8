"""TWINS (Liu et al., CVPR 2023), as the authors' train-TWINS-AT.py and train-TWINS-TRADES.py do it: full
fine-tuning of a model with doubled BatchNorms (`twin_bn`), one half of each batch through the frozen
pre-trained BNs and the other through the adaptive ones; loss, weights, learning-rate schedule and weight
decay from config.twins (docs/methods.md, "TWINS")."""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from autolora_jax import losses
from autolora_jax import step_parts as steps
from autolora_jax import value_checks as checks
from autolora_jax.errors import ConfigError
from autolora_jax.methods import core

LOSSES = ('at', 'trades')  # TWINS-AT, TWINS-TRADES


class Twins(NamedTuple):
  """TWINS's loss: 'at' (TWINS-AT) or 'trades' (TWINS-TRADES), lam (the frozen-BN half's weight) and beta
  (TWINS-TRADES's KL weight)."""
  loss: str
  lam: float
  beta: float


def make_loss(ctx: core.LossContext) -> core.LossFn:
  """The batch split by `steps.twin_halves`, one forward with bn='mix' (frozen BNs on the first half,
  adaptive ones on the second); `losses.twins_at_loss` on x_adv, or `losses.twins_trades_loss` (x_adv
  first, then x: the authors' order of the BN updates). adv_acc and nat_acc are the adaptive half's,
  frozen_adv_acc the frozen half's."""
  t = ctx.settings
  if not ctx.model.twin_bn or t is None or t.loss not in LOSSES:
    raise ValueError(f"method 'twins' needs a model with twin_bn=True and settings.loss in {LOSSES}; got "
                     f'twin_bn={ctx.model.twin_bn}, settings={t!r}.')
  kl_denominator = ctx.kl_denominator

  def loss_fn(params, state, x, x_adv, y):
    half = x.shape[0] // 2
    y = steps.twin_halves(y)
    yf, ya = y[:half], y[half:]
    adv_logits, stats = ctx.forward(params, state.batch_stats, steps.twin_halves(x_adv), bn='mix')
    accs = {'adv_acc': steps.accuracy(adv_logits[half:], ya),
            'frozen_adv_acc': steps.accuracy(adv_logits[:half], yf)}
    if t.loss == 'at':
      loss, parts = losses.twins_at_loss(adv_logits[:half], adv_logits[half:], yf, ya, t.lam)
    else:
      nat_logits, stats = ctx.forward(params, stats, steps.twin_halves(x), bn='mix')
      loss, parts = losses.twins_trades_loss(
          nat_logits[:half], adv_logits[:half], nat_logits[half:], adv_logits[half:], yf, ya, t.lam,
          t.beta, x.shape[0] if kl_denominator is None else kl_denominator)
      accs['nat_acc'] = steps.accuracy(nat_logits[half:], ya)
    return loss, (parts, stats, accs)

  return loss_fn


def defaults():
  """config.twins, with the defaults of the authors' TWINS scripts (train.sh of TWINS_high_res_data,
  ResNet-50, high-resolution data sets): SGD momentum 0.9, batch 128, lr 0.003 for 60 epochs, / 10 after
  epochs 30 and 50, weight decay 1e-3, lambda 0.4; CIFAR's scripts use weight decay 1e-5 and lambda 1.0
  (`cifar_settings`). PGD as config.attack (their 8/255, 2/255, 10 steps)."""
  t = ml_collections.ConfigDict()
  t.loss = 'at'  # 'at' (TWINS-AT) | 'trades' (TWINS-TRADES)
  t.lam = 0.4  # weight of the frozen-BN half's loss (their --lambda_twins)
  t.beta = 6.0  # TWINS-TRADES: weight of the KL terms (their --beta_trades)
  t.weight_decay = 1e-3  # replaces optim.weight_decay for TWINS
  t.lr = 0.003
  t.lr_schedule = 'piecewise'  # as config.fixed.lr_schedule
  t.boundaries = (30, 50)
  t.decay = 0.1
  t.epochs = 60
  return {'twins': t}


def cifar_settings(config):
  """TWINS's CIFAR settings (the authors' TWINS_cifar/train.sh): weight decay 1e-5, lambda 1.0."""
  config.twins.weight_decay = 1e-5
  config.twins.lam = 1.0
  return config


def check_section(config) -> None:
  t = config.twins
  checks.choice('twins.loss', t.loss, LOSSES)
  checks.check_lr_schedule('twins', t, 'a TWINS run')
  for name, what in (('lam', "the frozen-BN half's loss weight"), ('beta', "TWINS-TRADES's KL weight")):
    if not isinstance(t[name], (int, float)) or isinstance(t[name], bool) or t[name] < 0:
      raise ConfigError(f'config.twins.{name} ({what}) must be a number >= 0, got {t[name]!r}.')
  checks.in_range('twins.weight_decay', t.weight_decay, 0.0, 1.0, low_open=False)


def check_devices(config, device_count: int) -> None:
  """Every device's batch splits into two halves: an even per-device batch."""
  if (config.batch_size // device_count) % 2:
    even = max(2 * device_count, config.batch_size - config.batch_size % (2 * device_count))
    raise ConfigError(
        f'TWINS splits every device\'s batch into two halves (frozen and adaptive BatchNorms), but '
        f'config.batch_size={config.batch_size} gives each of the {device_count} devices '
        f'{config.batch_size // device_count} examples, an odd number. Use a multiple of {2 * device_count}, '
        f'e.g. --config.batch_size={even}.')


def settings(config) -> Twins:
  t = config.twins
  return Twins(str(t.loss), float(t.lam), float(t.beta))


def model_overrides(config) -> dict:
  del config
  return {'lora_rank': 0, 'twin_bn': True}  # full fine-tuning with doubled BatchNorms


def weight_decay(config) -> float:
  """config.twins.weight_decay (its scripts' own) replaces config.optim.weight_decay."""
  return float(config.twins.weight_decay)


def make_policy(config):
  """config.twins's fixed schedule; its loss has no l1, l2."""
  return core.fixed_schedule_policy(config.twins, 0.0, 0.0)


def results(s: Twins) -> dict:
  return {'twins': s._asdict()}  # TWINS-AT or TWINS-TRADES, lam, beta


METHOD = core.Method(
    name='twins', display_name='TWINS', make_loss=make_loss, policy=make_policy, settings=settings,
    sections=('twins',), defaults=defaults, check_section=check_section, check_devices=check_devices,
    model_overrides=model_overrides, weight_decay=weight_decay, results=results, needs_batchnorm=True,
    in_default_comparison=True)
