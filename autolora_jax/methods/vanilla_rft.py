"""Vanilla RFT (docs/method.md, "Vanilla RFT"): AutoLoRa's loss with the natural logits from the FE itself (no LoRa
parameters), fixed l1, l2 and learning-rate schedule from config.fixed."""

from __future__ import annotations

import ml_collections

from autolora_jax import value_checks as checks
from autolora_jax.errors import ConfigError
from autolora_jax.methods import autolora, core

# AutoLoRa's loss with z_nat the FE itself on x (first), z_adv the FE on x_adv.
make_loss = autolora.two_branch_loss(lambda params: params, 'adv')


def defaults():
  """config.fixed, vanilla RFT's settings (PGD-AT uses its lr schedule with l1 = l2 = 0). TRADES's weights
  (no natural CE, KL weight beta = 6), AutoLoRa's initial lr 0.01 and the usual step schedule of
  adversarial training: lr / 10 after 50% and 75% of the epochs."""
  fixed = ml_collections.ConfigDict()
  fixed.l1 = 0.0
  fixed.l2 = 6.0
  fixed.lr = 0.01
  fixed.lr_schedule = 'piecewise'  # 'constant' | 'piecewise' | 'cosine' (over epochs)
  fixed.boundaries = (30, 45)  # piecewise: the lr is multiplied by `decay` after these many epochs
  fixed.decay = 0.1
  fixed.epochs = 60
  return {'fixed': fixed}


def check_section(config) -> None:
  f = config.fixed
  checks.check_lr_schedule('fixed', f, 'a vanilla RFT or PGD-AT run')
  if not isinstance(f.l1, (int, float)) or not 0 <= f.l1 <= 1:
    raise ConfigError(f'config.fixed.l1 (weight of the natural cross-entropy) must lie in [0, 1], got '
                      f'{f.l1!r}.')
  if not isinstance(f.l2, (int, float)) or f.l2 < 0:
    raise ConfigError(f'config.fixed.l2 (weight of the KL term) must be >= 0, got {f.l2!r}.')


def no_lora(config) -> dict:
  """The baselines' model: no LoRa parameters at all."""
  del config
  return {'lora_rank': 0}


def make_policy(config):
  f = config.fixed
  return core.fixed_schedule_policy(f, f.l1, f.l2)


METHOD = core.Method(
    name='vanilla_rft', display_name='vanilla RFT', make_loss=make_loss, policy=make_policy,
    sections=('fixed',), defaults=defaults, check_section=check_section, model_overrides=no_lora,
    in_default_comparison=True)
