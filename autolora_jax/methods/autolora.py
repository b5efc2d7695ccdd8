"""AutoLoRa (Xu et al., ICLR 2024; docs/method.md): the natural objective through the LoRa branch, the adversarial
one through the FE, with the automatic learning rate and loss scalars.

Loss per batch: l1 * CE(z_nat) + (1 - l1) * CE(z_adv) + l2 * KL(p_nat || p_adv), z_nat the natural branch
(W + dW) on x with the FE held constant (`steps.route_natural`), z_adv the adversarial branch (W) on x_adv.
The natural forward runs first, as the reference does; both run BatchNorm in training mode.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from autolora_jax import losses, policy
from autolora_jax import step_parts as steps
from autolora_jax import value_checks as checks
from autolora_jax.errors import ConfigError
from autolora_jax.methods import core


def two_branch_loss(natural_params, natural_branch: str):
  """`Method.make_loss` of l1 * CE(z_nat) + (1 - l1) * CE(z_adv) + l2 * KL(p_nat || p_adv), z_nat the model's
  `natural_branch` with `natural_params(params)` on x (first), z_adv the adversarial branch on x_adv;
  metrics: the loss's parts, adv_acc (z_adv) and nat_acc (z_nat)."""

  def make_loss(ctx: core.LossContext) -> core.LossFn:

    def loss_fn(params, state, x, x_adv, y):
      nat_logits, stats = ctx.forward(natural_params(params), state.batch_stats, x, branch=natural_branch)
      adv_logits, stats = ctx.forward(params, stats, x_adv, branch='adv')
      loss, parts = losses.autolora_loss(nat_logits, adv_logits, y, state.l1, state.l2, ctx.kl_denominator)
      accs = {'adv_acc': steps.accuracy(adv_logits, y), 'nat_acc': steps.accuracy(nat_logits, y)}
      return loss, (parts, stats, accs)

    return loss_fn

  return make_loss


# AutoLoRa's: z_nat the natural branch (W + dW) with the FE held constant.
make_loss = two_branch_loss(steps.route_natural, 'nat')


def defaults():
  """config.auto_lr (the automatic learning rate, from the validation robust accuracy) and
  config.auto_scalars (l1, l2 from the natural branch's accuracy); docs/method.md's values."""
  auto_lr = ml_collections.ConfigDict()
  # A number, or 'auto': a probe over lr0_candidates picks it (autolora_jax/lr_probe.py). Typed `object` so that
  # both `config.auto_lr.lr0 = 'auto'` and --config.auto_lr.lr0=auto work; config.json holds the same 0.01.
  auto_lr.lr0 = config_dict.FieldReference(0.01, field_type=object)
  auto_lr.lr0_candidates = (0.003, 0.01, 0.03, 0.1)  # lr0='auto': the rates the probe tries, in this order
  auto_lr.probe_steps = 0  # lr0='auto': train steps of epoch 1 per candidate (0: the whole first epoch)
  auto_lr.window = 4
  auto_lr.rho = 0.75
  auto_lr.max_epochs = 60
  auto_lr.min_lr = 1e-5
  auto_scalars = ml_collections.ConfigDict()
  auto_scalars.l2_max = 6.0
  return {'auto_lr': auto_lr, 'auto_scalars': auto_scalars}


def check_section(config) -> None:
  s = config.auto_lr
  if isinstance(s.lr0, str) and not is_auto(s.lr0):
    raise ConfigError(f"config.auto_lr.lr0 must be a learning rate in (0, 10] or 'auto' (a probe picks it from "
                      f'config.auto_lr.lr0_candidates), got {s.lr0!r}.')
  if not is_auto(s.lr0):
    checks.in_range('auto_lr.lr0', s.lr0, 0.0, 10.0)
  candidates = tuple(s.get('lr0_candidates', ()))
  if not candidates or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c <= 10
                               for c in candidates) or len(set(candidates)) != len(candidates):
    raise ConfigError(f'config.auto_lr.lr0_candidates must be distinct learning rates in (0, 10], got '
                      f'{candidates!r} (e.g. --config.auto_lr.lr0_candidates="(0.003, 0.01, 0.03, 0.1)").')
  probe_steps = s.get('probe_steps', 0)
  if not isinstance(probe_steps, int) or isinstance(probe_steps, bool) or probe_steps < 0:
    raise ConfigError(f'config.auto_lr.probe_steps must be an integer >= 0 (train steps of the first epoch per '
                      f'candidate of lr0=auto; 0: the whole epoch), got {probe_steps!r}.')
  checks.in_range('auto_lr.rho', s.rho, 0.0, 1.0)
  checks.positive_int('auto_lr.window', s.window)
  checks.positive_int('auto_lr.max_epochs', s.max_epochs)
  checks.in_range('auto_lr.min_lr', s.min_lr, 0.0, 10.0, low_open=False)
  checks.in_range('auto_scalars.l2_max', config.auto_scalars.l2_max, 0.0, 1e6, low_open=False)


def is_auto(lr0) -> bool:
  """Whether config.auto_lr.lr0 asks for the probe ('auto', any case)."""
  return isinstance(lr0, str) and lr0.strip().lower() == 'auto'


def initial_lr(config) -> float:
  """config.auto_lr.lr0 as a number; for lr0='auto' the first candidate, a placeholder that the probe's pick
  replaces before any step trains."""
  lr0 = config.auto_lr.lr0
  return float(config.auto_lr.lr0_candidates[0]) if is_auto(lr0) else float(lr0)


def check(config) -> None:
  rank = config.model.lora_rank
  if rank <= 0:
    raise ConfigError(f'config.model.lora_rank must be a positive integer for AutoLoRa (the natural branch '
                      f'lives in the LoRa parameters), got {rank!r}; the paper uses 8.')


def model_overrides(config) -> dict:
  if config.reference_compat:
    # Item 1: the public code's stage container passes the branch flag to the last block only, and its
    # shortcut convolutions carry no LoRa.
    return {'lora_placement': 'last_block'}
  return {}


def make_policy(config) -> policy.EpochPolicy:
  """`policy.autolora_policy`: config.auto_lr and config.auto_scalars; under reference_compat the public
  code's condition 2 (item 3) and the scalars from the augmented training split (item 2)."""
  s = config.auto_lr
  # Item 3 (reference_compat): the public code's condition 2, "the best has not improved since the
  # previous checkpoint", which never fires at the first checkpoint.
  lr = policy.auto_lr(lr0=initial_lr(config), window=s.window, rho=s.rho, max_epochs=s.max_epochs, min_lr=s.min_lr,
                      condition2='reference' if config.reference_compat else 'paper')
  return policy.autolora_policy(lr, config.auto_scalars.l2_max,
                                scalar_source='train' if config.reference_compat else 'validation')  # 2


METHOD = core.Method(
    name='autolora', display_name='AutoLoRa', make_loss=make_loss, policy=make_policy,
    sections=('auto_lr', 'auto_scalars'), defaults=defaults, check_section=check_section, check=check,
    model_overrides=model_overrides, in_default_comparison=True, auto_lr0=True)
