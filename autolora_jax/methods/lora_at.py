"""LoRa-AT: adversarial training of the LoRa branch and the head alone, the FE frozen; the
parameter-efficient robust fine-tuning baseline of the robust-PEFT literature (adversarial training of
LoRA adapters on a frozen robust backbone).

* **Model**: the FE with the LoRa branch of `config.model` (rank, placement); the trained and deployed model
  is branch 'nat', every LoRa-carrying layer computing with W + dW (dW = B A * alpha / rank, docs/method.md).
* **Loss**: CE(z, y), z the W + dW model (BatchNorm in training mode) on x_adv; x_adv is PGD against the
  same W + dW model in evaluation mode (random start, config.attack), so the attack targets the model being
  trained. Validation, test, AutoAttack and `autolora_jax.load` evaluate W + dW too.
* **What trains**: the LoRa factors and the head. The FE (convolution or dense kernels, BatchNorm and
  LayerNorm scale and bias) is held constant in the forward (`steps.route_natural`: zero gradients) and
  the optimizer gives it exact zero updates (no weight decay either; no momentum is kept for it).
* **BatchNorm statistics**: the training forward runs BatchNorm in training mode, so the running mean and
  variance follow the downstream data, as they do in every other method's training forward (and in
  AutoLoRa's natural branch); they are statistics, not trained weights. The BN scale and bias stay frozen.
* **Schedule**: fixed, from config.lora_at (lr, lr_schedule, boundaries, decay, epochs, as config.fixed);
  no loss scalars.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from autolora_jax import losses, models
from autolora_jax import step_parts as steps
from autolora_jax import value_checks as checks
from autolora_jax.errors import ConfigError
from autolora_jax.methods import core


def make_loss(ctx: core.LossContext) -> core.LossFn:
  """CE of the W + dW model (the FE held constant) on x_adv; metrics ce_adv and adv_acc."""

  def loss_fn(params, state, x, x_adv, y):
    del x
    logits, stats = ctx.forward(steps.route_natural(params), state.batch_stats, x_adv, branch='nat')
    loss = losses.cross_entropy(logits, y)
    return loss, ({'ce_adv': loss}, stats, {'adv_acc': steps.accuracy(logits, y)})

  return loss_fn


def trainable_labels(params):
  """'frozen' for every FE parameter, 'train' for the LoRa factors and the head (`models.param_groups`)."""
  return jax.tree_util.tree_map(lambda g: 'frozen' if g == 'fe' else 'train', models.param_groups(params))


def frozen_fe_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 1e-4):
  """`steps.sgd` on the LoRa factors and the head; exact zero updates for the FE."""
  return optax.multi_transform({'train': steps.sgd(learning_rate, momentum, weight_decay),
                                'frozen': optax.set_to_zero()}, trainable_labels)


def make_optimizer(learning_rate: float, momentum: float, weight_decay: float):
  """`frozen_fe_sgd` with the learning rate injected (the host sets it each epoch, `steps.set_learning_rate`)."""
  return optax.inject_hyperparams(frozen_fe_sgd, static_args=('momentum', 'weight_decay'))(
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)


def defaults():
  """config.lora_at: the fixed learning-rate schedule (as config.fixed's: lr / 10 after 50% and 75%)."""
  c = ml_collections.ConfigDict()
  c.lr = 0.01
  c.lr_schedule = 'piecewise'  # 'constant' | 'piecewise' | 'cosine' (over epochs)
  c.boundaries = (30, 45)
  c.decay = 0.1
  c.epochs = 60
  return {'lora_at': c}


def check_section(config) -> None:
  checks.check_lr_schedule('lora_at', config.lora_at, 'a LoRa-AT run')


def check(config) -> None:
  rank = config.model.lora_rank
  if rank <= 0:
    raise ConfigError(f'config.model.lora_rank must be a positive integer for lora_at (it trains the LoRa '
                      f'factors and the head alone), got {rank!r}; e.g. --config.model.lora_rank=8.')


def make_policy(config):
  return core.fixed_schedule_policy(config.lora_at, 0.0, 0.0)


METHOD = core.Method(
    name='lora_at', display_name='LoRa-AT', make_loss=make_loss, policy=make_policy, sections=('lora_at',),
    defaults=defaults, check_section=check_section, check=check, make_optimizer=make_optimizer,
    deployed_branch='nat')
