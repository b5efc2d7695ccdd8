"""The pieces a train step is made of and that the methods' losses use: the train state and its optimizer
(SGD with coupled weight decay, the learning rate injected by the host), the natural branch's gradient routing,
the images' scaling, per-example keys, TWINS's batch halves, accuracy.

`autolora_jax.steps` assembles the steps from them and re-exports every name here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from autolora_jax import models


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
