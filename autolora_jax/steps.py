"""The pure per-device steps: train state, optimizer, the train step of every method and the evaluation step.

Each step is a pure function meant for `jax.pmap(..., axis_name='batch')`:

    train_step(state, batch, rng) -> (state, metrics)
    eval_step(state, batch) -> summed counts

A batch's images may be uint8 (scaled to [0, 1] here, on the device: `unit_images`) or float32 in [0, 1].

Gradients, BatchNorm statistics and metrics are reduced over the mapped axis, so any number of devices
computes what one device computes on the whole global batch.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from autolora_jax import attacks, methods
from autolora_jax import remat as remat_lib
from autolora_jax.step_parts import (  # noqa: F401
  TrainState,
  accuracy,
  create_train_state,
  example_keys,
  get_learning_rate,
  make_optimizer,
  route_natural,
  set_learning_rate,
  set_loss_scalars,
  sgd,
  twin_halves,
  unit_images,
)

AXIS = 'batch'


def __getattr__(name):
  """METHODS (the registered methods' names, `autolora_jax.methods.names()`) and TWINS_LOSSES (TWINS's
  losses, `methods.twins.LOSSES`), read from the registry when asked."""
  if name == 'METHODS':
    return methods.names()
  if name == 'TWINS_LOSSES':
    return methods.twins.LOSSES
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def make_train_step(model, *, method='autolora', eps: float, step_size: float, steps: int,
                    kl_denominator: Optional[float] = None, settings: Any = None,
                    twins_loss: Optional[str] = None, twins_lam: Optional[float] = None,
                    twins_beta: Optional[float] = None, axis_name: Optional[str] = AXIS,
                    norm: str = 'linf', remat: str = 'none') -> Callable:
  """Builds the per-device train step `(state, batch, rng) -> (state, metrics)` of a method.

  The step: x_adv is PGD (random start, a key per example) on the method's deployed branch in evaluation
  mode; then the gradient of the method's loss (`Method.make_loss`, its forwards in training mode),
  averaged over the mapped devices, updates the state; the BatchNorm statistics are the loss's forwards'.
  A model with stochastic depth (a `drop_path` attribute above 0) draws it from the examples' PGD keys,
  folded with the forward's position in the loss (`keyed_forward`): the natural and adversarial forwards
  drop independently, and any number of devices trains what one device trains.
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
    remat: 'none', or 'forwards': the loss's forward passes keep no activations, the backward pass recomputes
      them one at a time (`autolora_jax.remat`): the peak memory of one forward pass instead of the loss's
      two, for one more forward pass of compute each.
  """
  if remat not in remat_lib.MODES:
    raise ValueError(f'remat={remat!r}: choose one of {remat_lib.MODES}.')
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

  context = methods.LossContext(model=model, forward=forward, settings=settings, kl_denominator=kl_denominator)
  loss_fn = m.make_loss(context)
  stochastic = bool(getattr(model, 'drop_path', 0.0))

  def train_step(state: TrainState, batch: Dict[str, jax.Array], rng) -> tuple:
    x, y = unit_images(batch['image']), batch['label']
    eval_vars = {'params': state.params, 'batch_stats': state.batch_stats}
    keys = example_keys(rng, batch['index'])
    x_adv = attacks.pgd(lambda z: model.apply(eval_vars, z, branch=branch, train=False), x, y, eps=eps,
                        step_size=step_size, steps=steps, key=keys, norm=norm)
    x_adv = lax.stop_gradient(x_adv)
    # Both wrappers number the loss's calls: new ones for every trace.
    step_forward = remat_lib.in_turn(forward) if remat == 'forwards' else forward
    if stochastic:
      step_forward = keyed_forward(step_forward, keys)
    step_loss = loss_fn if step_forward is forward else m.make_loss(context._replace(forward=step_forward))
    (loss, (parts, batch_stats, accs)), grads = jax.value_and_grad(step_loss, has_aux=True)(
        state.params, state, x, x_adv, y)
    grads = pmean(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {'loss': loss, **parts, **accs, 'grad_norm': optax.tree.norm(grads)}
    return new_state, pmean(metrics)

  return train_step


def keyed_forward(forward: Callable, keys) -> Callable:
  """`forward` whose n-th call (0, 1, ... in the order the loss makes them) passes the model
  drop_keys = fold_in(keys[i], n) for example i: each training-mode forward of a step draws its stochastic
  depth apart, and an example's draws depend only on its key. The keys follow the batch's rows as given."""
  calls = itertools.count()

  def forward_with_keys(params, stats, x, **kwargs):
    n = next(calls)
    drop_keys = jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)
    return forward(params, stats, x, drop_keys=drop_keys, **kwargs)

  return forward_with_keys


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
