"""PGD-AT (Madry et al., ICLR 2018): the adversarial cross-entropy alone (l1 = l2 = 0), no LoRa parameters, the
learning-rate schedule of config.fixed (its l1, l2 are not read). It also pre-trains the robust FE
(pretrain.py)."""

from __future__ import annotations

from autolora_jax import losses
from autolora_jax import step_parts as steps
from autolora_jax.methods import core, vanilla_rft


def make_loss(ctx: core.LossContext) -> core.LossFn:
  """CE(z_adv), z_adv the FE on x_adv; no natural forward at all."""

  def loss_fn(params, state, x, x_adv, y):
    del x
    adv_logits, stats = ctx.forward(params, state.batch_stats, x_adv, branch='adv')
    loss = losses.cross_entropy(adv_logits, y)
    return loss, ({'ce_adv': loss}, stats, {'adv_acc': steps.accuracy(adv_logits, y)})

  return loss_fn


def make_policy(config):
  return core.fixed_schedule_policy(config.fixed, 0.0, 0.0)


METHOD = core.Method(
    name='pgd_at', display_name='PGD-AT', make_loss=make_loss, policy=make_policy, sections=('fixed',),
    model_overrides=vanilla_rft.no_lora, in_default_comparison=True)
