"""The pure per-device steps: train state, optimizer, AutoLoRa train step and evaluation step.

Each step is a pure function meant for `jax.pmap(..., axis_name='batch')`:

    train_step(state, batch, rng) -> (state, metrics)
    eval_step(state, batch) -> summed counts

A batch's images may be uint8 (scaled to [0, 1] here, on the device: `unit_images`) or float32 in [0, 1].

Gradients, BatchNorm statistics and metrics are reduced over the mapped axis, so any number of devices
computes what one device computes on the whole global batch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from autolora_jax import attacks, losses, models

AXIS = 'batch'
METHODS = ('autolora', 'vanilla_rft', 'pgd_at', 'twins')
TWINS_LOSSES = ('at', 'trades')  # TWINS-AT, TWINS-TRADES


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics and the loss scalars that the host sets each epoch.

  The learning rate lives in the optimizer state (`optax.inject_hyperparams`); see `set_learning_rate`.
  """
  batch_stats: Any = None
  l1: jax.Array = None
  l2: jax.Array = None


def sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """SGD with momentum and PyTorch's coupled weight decay (wd * param added to the gradient)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def make_optimizer(learning_rate: float, momentum: float, weight_decay: float):
  """`sgd` with the learning rate as an injected hyper-parameter that the host can set between steps."""
  return optax.inject_hyperparams(sgd, static_args=('momentum', 'weight_decay'))(
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)


def create_train_state(model, variables, tx, l1: float = 0.0, l2: float = 0.0) -> TrainState:
  """A TrainState around `variables` = {'params', 'batch_stats'} (unreplicated)."""
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables['batch_stats'], l1=jnp.float32(l1), l2=jnp.float32(l2))


def get_learning_rate(state: TrainState) -> float:
  """The learning rate of the next step (works on a replicated state too)."""
  return float(jnp.ravel(state.opt_state.hyperparams['learning_rate'])[0])


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  """Sets the injected learning rate; keeps a replicated state's leading device axis."""
  hp = dict(state.opt_state.hyperparams)
  hp['learning_rate'] = jnp.full_like(hp['learning_rate'], lr)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))


def set_loss_scalars(state: TrainState, l1: float, l2: float) -> TrainState:
  """Sets l1 and l2; keeps a replicated state's leading device axis."""
  return state.replace(l1=jnp.full_like(state.l1, l1), l2=jnp.full_like(state.l2, l2))


def route_natural(params):
  """The parameters as the natural forward sees them: FE (conv + BN scale/bias) held constant."""
  groups = models.param_groups(params)
  return jax.tree_util.tree_map(lambda g, p: lax.stop_gradient(p) if g == 'fe' else p, groups, params)


def unit_images(images):
  """A batch's images as float32 in [0, 1]: uint8 (N, H, W, C) times float32(1 / 255), on the device (bit
  for bit the host's data.core.to_unit); float32 ones as they are."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
  return images


def example_keys(rng, index):
  """One PRNG key per example from the step key and the example's position in the global batch."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def twin_halves(a):
  """TWINS's batch split: rows 0, 2, 4, ... (the frozen-BN half) then rows 1, 3, 5, ... (the adaptive half).

  The split goes by position parity, so that with an even per-device batch every device holds half of
  each and the halves (even and odd positions of the global batch) are the same for any device count.
  """
  return jnp.concatenate([a[0::2], a[1::2]], axis=0)


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def make_train_step(model, *, method: str = 'autolora', eps: float, step_size: float, steps: int,
                    kl_denominator: Optional[float] = None, twins_loss: str = 'at', twins_lam: float = 1.0,
                    twins_beta: float = 6.0, axis_name: Optional[str] = AXIS, norm: str = 'linf') -> Callable:
  """Builds the per-device train step `(state, batch, rng) -> (state, metrics)`.

  Methods (SPEC.md; TWINS from the authors' train-TWINS-AT.py and train-TWINS-TRADES.py):
    'autolora': z_nat = natural (LoRa) branch on x with the FE held constant, z_adv = adversarial branch on
      x_adv; loss l1 * CE(z_nat) + (1 - l1) * CE(z_adv) + l2 * KL(p_nat || p_adv).
    'vanilla_rft': the same loss with z_nat from the FE itself (adversarial branch on x, no routing).
    'pgd_at': CE(z_adv) alone (l1 = l2 = 0); no natural forward at all.
    'twins': a model with doubled BatchNorms (`twin_bn`); the batch split by `twin_halves`, one half
      through the frozen BNs and the other through the adaptive ones (bn='mix'), and
      `losses.twins_at_loss` (twins_loss 'at', on x_adv) or `losses.twins_trades_loss` ('trades': x_adv
      first, then x, as the authors' order of the BN updates) with twins_lam and twins_beta.
  x_adv is PGD (random start, a key per example) on the adversarial branch (the adaptive BNs) in evaluation
  mode. The training forwards run BatchNorm in training mode, for AutoLoRa the natural one first, as the
  reference does.

  Args:
    model: a `models.ResNet` (with twin_bn=True for 'twins').
    eps, step_size, steps, norm: the training attack (norm 'linf' or 'l2', `attacks.pgd`).
    kl_denominator: divide the KL sum by this instead of the batch size (TWINS-TRADES: None is the
      per-device batch, both halves, as the authors divide by their whole batch).
    axis_name: the pmap axis to reduce over; None for an unmapped (single-device, jit) step.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  if method == 'twins' and (not model.twin_bn or twins_loss not in TWINS_LOSSES):
    raise ValueError(f"method 'twins' needs a model with twin_bn=True and twins_loss in {TWINS_LOSSES}; got "
                     f'twin_bn={model.twin_bn}, twins_loss={twins_loss!r}.')
  train_model = model.clone(bn_axis_name=axis_name)

  def pmean(x):
    return lax.pmean(x, axis_name) if axis_name else x

  def forward(params, stats, x, **kwargs):
    logits, upd = train_model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                    mutable=['batch_stats'], **kwargs)
    return logits, upd['batch_stats']

  def autolora_loss_fn(params, state, x, x_adv, y):
    """The loss of 'autolora', 'vanilla_rft' and 'pgd_at': (loss, (parts, batch_stats, accuracies))."""
    stats, nat_logits = state.batch_stats, None
    if method != 'pgd_at':
      nat_branch, nat_params = ('nat', route_natural(params)) if method == 'autolora' else ('adv', params)
      nat_logits, stats = forward(nat_params, stats, x, branch=nat_branch)
    adv_logits, stats = forward(params, stats, x_adv, branch='adv')
    if method == 'pgd_at':
      loss = losses.cross_entropy(adv_logits, y)
      parts = {'ce_adv': loss}
    else:
      loss, parts = losses.autolora_loss(nat_logits, adv_logits, y, state.l1, state.l2, kl_denominator)
    accs = {'adv_acc': accuracy(adv_logits, y)}
    if nat_logits is not None:
      accs['nat_acc'] = accuracy(nat_logits, y)
    return loss, (parts, stats, accs)

  def twins_loss_fn(params, state, x, x_adv, y):
    """TWINS: adv_acc and nat_acc are the adaptive half's, frozen_adv_acc the frozen half's."""
    half = x.shape[0] // 2
    y = twin_halves(y)
    yf, ya = y[:half], y[half:]
    adv_logits, stats = forward(params, state.batch_stats, twin_halves(x_adv), bn='mix')
    accs = {'adv_acc': accuracy(adv_logits[half:], ya), 'frozen_adv_acc': accuracy(adv_logits[:half], yf)}
    if twins_loss == 'at':
      loss, parts = losses.twins_at_loss(adv_logits[:half], adv_logits[half:], yf, ya, twins_lam)
    else:
      nat_logits, stats = forward(params, stats, twin_halves(x), bn='mix')
      loss, parts = losses.twins_trades_loss(
          nat_logits[:half], adv_logits[:half], nat_logits[half:], adv_logits[half:], yf, ya, twins_lam,
          twins_beta, x.shape[0] if kl_denominator is None else kl_denominator)
      accs['nat_acc'] = accuracy(nat_logits[half:], ya)
    return loss, (parts, stats, accs)

  loss_fn = twins_loss_fn if method == 'twins' else autolora_loss_fn

  def train_step(state: TrainState, batch: Dict[str, jax.Array], rng) -> tuple:
    x, y = unit_images(batch['image']), batch['label']
    eval_vars = {'params': state.params, 'batch_stats': state.batch_stats}
    x_adv = attacks.pgd(lambda z: model.apply(eval_vars, z, branch='adv', train=False), x, y, eps=eps,
                        step_size=step_size, steps=steps, key=example_keys(rng, batch['index']), norm=norm)
    x_adv = lax.stop_gradient(x_adv)
    (loss, (parts, batch_stats, accs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, x, x_adv, y)
    grads = pmean(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {'loss': loss, **parts, **accs, 'grad_norm': optax.tree.norm(grads)}
    return new_state, pmean(metrics)

  return train_step


def make_eval_step(model, *, eps: float, step_size: float, steps: int, attack: bool = True,
                   axis_name: Optional[str] = AXIS, norm: str = 'linf') -> Callable:
  """Builds `eval_step(state, batch) -> counts`: correct-prediction counts summed over the batch and devices.

  Counts (masked): 'count' (real examples), 'clean_adv' and 'clean_nat' (clean accuracy of each branch)
  and, with attack=True, 'pgd' (PGD robust accuracy of the adversarial branch under `norm`, no random
  start). Everything
  runs in evaluation mode.
  """

  def psum(x):
    return lax.psum(x, axis_name) if axis_name else x

  def eval_step(state: TrainState, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    x, y, mask = unit_images(batch['image']), batch['label'], batch['mask']

    def logits_fn(branch):
      return lambda z: model.apply(variables, z, branch=branch, train=False)

    def correct(logits):
      return jnp.sum((jnp.argmax(logits, -1) == y) * mask)

    counts = {'count': jnp.sum(mask), 'clean_adv': correct(logits_fn('adv')(x)),
              'clean_nat': correct(logits_fn('nat')(x))}
    if attack:
      x_adv = attacks.pgd(logits_fn('adv'), x, y, eps=eps, step_size=step_size, steps=steps, norm=norm)
      counts['pgd'] = correct(logits_fn('adv')(x_adv))
    return psum(counts)

  return eval_step
