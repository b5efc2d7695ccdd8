"""The pure per-device steps: train state, optimizer, the train step of every method and the evaluation step.

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

from autolora_jax import attacks, models

AXIS = 'batch'


def __getattr__(name):
  """METHODS (the registered methods' names, `autolora_jax.methods.names()`) and TWINS_LOSSES (TWINS's
  losses, `methods.twins.LOSSES`), read from where they are defined."""
  if name in ('METHODS', 'TWINS_LOSSES'):
    from autolora_jax import methods  # pylint: disable=g-import-not-at-top (the methods import this module)
    return methods.names() if name == 'METHODS' else methods.twins.LOSSES
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


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


def make_train_step(model, *, method='autolora', eps: float, step_size: float, steps: int,
                    kl_denominator: Optional[float] = None, settings: Any = None,
                    twins_loss: Optional[str] = None, twins_lam: Optional[float] = None,
                    twins_beta: Optional[float] = None, axis_name: Optional[str] = AXIS,
                    norm: str = 'linf') -> Callable:
  """Builds the per-device train step `(state, batch, rng) -> (state, metrics)` of a method.

  The step: x_adv is PGD (random start, a key per example) on the method's deployed branch in evaluation
  mode; then the gradient of the method's loss (`Method.make_loss`, its forwards in training mode),
  averaged over the mapped devices, updates the state; the BatchNorm statistics are the loss's forwards'.
  Metrics: 'loss', the loss's parts and accuracies, 'grad_norm' (averaged over the devices).

  Args:
    model: the run's model (a `models.ResNet`, with twin_bn=True for 'twins', or a `models.ViT`).
    method: a name from `autolora_jax.methods.names()` or a `methods.Method`.
    eps, step_size, steps, norm: the training attack (norm 'linf' or 'l2', `attacks.pgd`).
    kl_denominator: divide the KL sum by this instead of the batch size (TWINS-TRADES: None is the
      per-device batch, both halves, as the authors divide by their whole batch).
    settings: the method's settings (`Method.settings(config)`); None: TWINS's from twins_loss, twins_lam
      and twins_beta (defaults 'at', 1.0, 6.0) for 'twins', none for the other methods.
    axis_name: the pmap axis to reduce over; None for an unmapped (single-device, jit) step.
  """
  from autolora_jax import methods  # pylint: disable=g-import-not-at-top (the methods import this module)
  m = methods.get(method)
  if settings is None and m.name == 'twins':
    settings = methods.twins.Twins('at' if twins_loss is None else twins_loss,
                                   1.0 if twins_lam is None else twins_lam, 6.0 if twins_beta is None else twins_beta)
  train_model = model.clone(bn_axis_name=axis_name)
  branch = m.deployed_branch

  def pmean(x):
    return lax.pmean(x, axis_name) if axis_name else x

  def forward(params, stats, x, **kwargs):
    logits, upd = train_model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                    mutable=['batch_stats'], **kwargs)
    return logits, upd['batch_stats']

  loss_fn = m.make_loss(methods.LossContext(model=model, forward=forward, settings=settings,
                                            kl_denominator=kl_denominator))

  def train_step(state: TrainState, batch: Dict[str, jax.Array], rng) -> tuple:
    x, y = unit_images(batch['image']), batch['label']
    eval_vars = {'params': state.params, 'batch_stats': state.batch_stats}
    x_adv = attacks.pgd(lambda z: model.apply(eval_vars, z, branch=branch, train=False), x, y, eps=eps,
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
                   axis_name: Optional[str] = AXIS, norm: str = 'linf', branch: str = 'adv') -> Callable:
  """Builds `eval_step(state, batch) -> counts`: correct-prediction counts summed over the batch and devices.

  Counts (masked): 'count' (real examples), 'clean_adv' (clean accuracy of the deployed `branch`: the
  adversarial one, 'adv', for every method but one that deploys W + dW, `Method.deployed_branch`),
  'clean_nat' (the natural branch's) and, with attack=True, 'pgd' (PGD robust accuracy of the deployed
  branch under `norm`, no random start). Everything runs in evaluation mode.
  """

  def psum(x):
    return lax.psum(x, axis_name) if axis_name else x

  def eval_step(state: TrainState, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    x, y, mask = unit_images(batch['image']), batch['label'], batch['mask']

    def logits_fn(which):
      return lambda z: model.apply(variables, z, branch=which, train=False)

    def correct(logits):
      return jnp.sum((jnp.argmax(logits, -1) == y) * mask)

    counts = {'count': jnp.sum(mask), 'clean_adv': correct(logits_fn(branch)(x)),
              'clean_nat': correct(logits_fn('nat')(x))}
    if attack:
      x_adv = attacks.pgd(logits_fn(branch), x, y, eps=eps, step_size=step_size, steps=steps, norm=norm)
      counts['pgd'] = correct(logits_fn(branch)(x_adv))
    return psum(counts)

  return eval_step
