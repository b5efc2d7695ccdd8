"""Projected gradient descent (PGD) under an L-infinity or L2 budget, as a pure function over a `logits_fn`.

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

NORMS = ('linf', 'l2')


def _per_example(key) -> bool:
  return key.ndim == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)


def _l2(d):
  """Per-example L2 norm, shaped to broadcast against d."""
  return jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)), keepdims=True))


def project_l2(x_adv, x, eps):
  """x_adv scaled towards x onto the L2 ball of radius eps, then clipped to [0, 1] (which only shortens the
  perturbation, so the result lies in both)."""
  d = x_adv - x
  r = _l2(d)
  return jnp.clip(x + d * (jnp.minimum(eps, r) / (r + 1e-12)), 0.0, 1.0)


def random_start(key, x, eps, norm: str = 'linf'):
  """linf: x + U(-eps, eps); l2: x + eps * u * g / ||g||_2 (g Gaussian, u ~ U(0, 1)), a point of the L2
  ball; clipped to [0, 1].

  `key` is one PRNG key for the whole batch or a batch of keys, one per example (leading axis = N).
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if norm == 'l2':
    def draw(k, shape):
      k1, k2 = jax.random.split(k)
      g = jax.random.normal(k1, shape, x.dtype)
      r = jax.random.uniform(k2, (shape[0],) + (1,) * (len(shape) - 1), x.dtype)
      return eps * r * g / (_l2(g) + 1e-12)
    noise = (jax.vmap(lambda k: draw(k, (1,) + x.shape[1:])[0])(key) if _per_example(key)
             else draw(key, x.shape))
  elif _per_example(key):
    noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -eps, eps))(key)
  else:
    noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  return jnp.clip(x + noise, 0.0, 1.0)


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x, y, *, eps, step_size, steps, key=None,
        norm: str = 'linf'):
  """PGD that maximises the cross-entropy of `logits_fn` under an L-infinity (norm='linf') or L2 budget.

  linf: each step moves by step_size * sign(grad), then clips to the eps-box around x and to [0, 1].
  l2: each step moves by step_size * grad / ||grad||_2 (per example), then scales the perturbation back
  onto the L2 ball of radius eps and clips to [0, 1] (`project_l2`).
  The loss is summed over the batch, so each example's step depends on that example alone.

  Args:
    logits_fn: maps images (N, H, W, C) to logits (N, K).
    x: clean images in [0, 1], (N, H, W, C).
    y: integer labels, (N,).
    eps: L-infinity radius, e.g. 8/255.
    step_size: per-step size, e.g. 2/255.
    steps: number of steps (static).
    key: None for no random start; a PRNG key, or one key per example, for a random start in the ball.
    norm: 'linf' or 'l2' (eps and step_size are then L2 lengths, e.g. 0.5 and 0.125 on CIFAR).
  Returns:
    Adversarial images, same shape and dtype as x, within eps of x in the norm and 0 <= x_adv <= 1.
  """
  if norm not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {norm!r}.')

  def loss(x_adv):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x_adv), y).sum()

  grad_fn = jax.grad(loss)
  x_adv = x if key is None else random_start(key, x, eps, norm)

  def step(_, x_adv):
    g = grad_fn(x_adv)
    if norm == 'l2':
      return project_l2(x_adv + step_size * g / (_l2(g) + 1e-12), x, eps)
    x_adv = x_adv + step_size * jnp.sign(g)
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)

  return lax.fori_loop(0, steps, step, x_adv)
