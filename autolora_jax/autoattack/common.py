"""Pieces the AutoAttack attacks share: per-example keys, the L-infinity box, the losses, the targets.

Shapes: images x (N, H, W, C) in [0, 1], labels y (N,) int, logits (N, K). Every function here is pure and
jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# A point counts as inside the eps-ball if max |x_adv - x| <= eps + BALL_TOL (float32 rounding of x +- eps).
BALL_TOL = 1e-6


def row_keys(key, n: int):
  """One PRNG key per example: `key` itself if it already is a batch of n keys, else fold_in(key, row).

  Per-example keys make an example's random draws independent of the batch it is attacked in.
  """
  key = jnp.asarray(key)
  if key.ndim == 2:
    if key.shape[0] != n:
      raise ValueError(f'{key.shape[0]} keys for {n} examples.')
    return key
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def project(x_adv, x, eps):
  """x_adv clipped to the L-infinity ball of radius eps around x and to [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def linf(d):
  """Per-example L-infinity norm of d (N, ...) -> (N,)."""
  return jnp.max(jnp.abs(d.reshape(d.shape[0], -1)), axis=1)


def bcast(v, like):
  """A per-example vector (N,) shaped to broadcast against `like` (N, ...)."""
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def set_active(active, n: int):
  """The per-example mask of examples to attack; all of them for None."""
  return jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)


def correct(logits, y):
  return jnp.argmax(logits, axis=-1) == y


def ce_loss(logits, y):
  """Cross-entropy per example, (N,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def dlr_loss(logits, y):
  """Difference of logits ratio (Croce & Hein 2020), untargeted, per example:
  -(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12), z_(k) the k-th largest logit. Needs K >= 3."""
  top = jax.lax.top_k(logits, 3)[0]
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), axis=-1)
  return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
  """Targeted DLR per example: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12). Needs K >= 4."""
  top = jax.lax.top_k(logits, 4)[0]
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  z_t = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def margin(logits, y):
  """z_y - max_{i != y} z_i per example: > 0 iff the example is classified correctly (ties aside)."""
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), axis=-1)
  return z_y - other


def ranked_class(logits, rank):
  """The class with the rank-th largest logit per example (rank 1 = the top class); rank may be traced."""
  order = jnp.argsort(logits, axis=-1)  # ascending
  return jnp.take(order, logits.shape[-1] - rank, axis=1)


def num_targets(n_target_classes: int, num_classes: int) -> int:
  """Target classes a targeted attack can use: at most num_classes - 1 (every class but the true one)."""
  return max(0, min(int(n_target_classes), int(num_classes) - 1))
