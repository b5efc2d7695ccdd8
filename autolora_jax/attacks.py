"""Projected gradient descent (PGD) under an L-infinity budget, as a pure function over a `logits_fn`.

The attack knows no model: `logits_fn(x) -> logits` is any differentiable function of images in [0, 1].
Training calls it with a random start (a key per example, so the noise does not depend on how the batch
is split over devices); validation and test call it without (key=None).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax


def random_start(key, x, eps):
  """x + U(-eps, eps), clipped to [0, 1].

  `key` is one PRNG key for the whole batch or a batch of keys, one per example (leading axis = N).
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  per_example = key.ndim == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)
  if per_example:
    noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -eps, eps))(key)
  else:
    noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  return jnp.clip(x + noise, 0.0, 1.0)


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x, y, *, eps, step_size, steps, key=None):
  """L-infinity PGD that maximises the cross-entropy of `logits_fn`.

  Each step moves by step_size * sign(grad), then projects onto the eps-ball around x and onto [0, 1].
  The loss is summed over the batch, so each example's step depends on that example alone.

  Args:
    logits_fn: maps images (N, H, W, C) to logits (N, K).
    x: clean images in [0, 1], (N, H, W, C).
    y: integer labels, (N,).
    eps: L-infinity radius, e.g. 8/255.
    step_size: per-step size, e.g. 2/255.
    steps: number of steps (static).
    key: None for no random start; a PRNG key, or one key per example, for a uniform start in the ball.
  Returns:
    Adversarial images, same shape and dtype as x, with |x_adv - x| <= eps and 0 <= x_adv <= 1.
  """

  def loss(x_adv):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x_adv), y).sum()

  grad_fn = jax.grad(loss)
  x_adv = x if key is None else random_start(key, x, eps)

  def step(_, x_adv):
    x_adv = x_adv + step_size * jnp.sign(grad_fn(x_adv))
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)

  return lax.fori_loop(0, steps, step, x_adv)
