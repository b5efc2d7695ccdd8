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


def with_restarts(attack_once, x, key, n_restarts: int, active=None):
  """Runs `attack_once(r, keys_r, active_r) -> (x_adv, found)` for restarts r = 0 .. n_restarts - 1, each
  on the active examples not yet fooled, with per-example keys fold_in(row key, r); keeps each example's
  first adversarial point. Returns (x_adv, fooled)."""
  n = x.shape[0]
  active = set_active(active, n)
  keys = row_keys(key, n)
  x_adv, fooled = x, jnp.zeros((n,), bool)
  for r in range(n_restarts):
    rk = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)  # pylint: disable=cell-var-from-loop
    adv_r, found = attack_once(r, rk, active & ~fooled)
    x_adv = jnp.where(bcast(found, x), adv_r, x_adv)
    fooled = fooled | found
  return x_adv, fooled


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


# ---------------------------------------------------------------------------------------------------------
# Threat models: 'Linf', 'L2', 'L1' (the original's names)
# ---------------------------------------------------------------------------------------------------------

NORMS = ('Linf', 'L2', 'L1')


def check_norm(norm: str, allowed, who: str) -> None:
  """Raises ValueError unless `norm` is one of `allowed` (the norms the original runs `who` with)."""
  if norm not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {norm!r}.')
  if norm not in allowed:
    raise ValueError(f'{who} runs under {", ".join(allowed)} only (as in the original AutoAttack), not '
                     f'norm={norm!r}.')


def lp(d, norm: str):
  """Per-example norm of d (N, ...) -> (N,) for 'Linf', 'L2' or 'L1'."""
  flat = d.reshape(d.shape[0], -1)
  if norm == 'Linf':
    return jnp.max(jnp.abs(flat), axis=1)
  if norm == 'L2':
    return jnp.sqrt(jnp.sum(flat * flat, axis=1))
  if norm == 'L1':
    return jnp.sum(jnp.abs(flat), axis=1)
  raise ValueError(norm)


def normalize(d, norm: str):
  """d / (||d|| + 1e-12) per example."""
  return d / (bcast(lp(d, norm), d) + 1e-12)


def ball_tol(eps, norm: str):
  """How far past eps a returned point may lie (float32 rounding): BALL_TOL, plus 1e-5 eps for the sums of
  the L2 and L1 norms."""
  return BALL_TOL if norm == 'Linf' else BALL_TOL + 1e-5 * eps


def in_ball(x_adv, x, eps, norm: str):
  """(N,) bool: x_adv within eps of x (up to `ball_tol`)."""
  return lp(x_adv - x, norm) <= eps + ball_tol(eps, norm)


def project_l2(x_adv, x, eps):
  """x_adv pulled onto the L2 ball of radius eps around x (scaled towards x), then clipped to [0, 1]
  (clipping only shortens the perturbation, so the point stays in the ball)."""
  d = x_adv - x
  r = lp(d, 'L2')
  scale = jnp.minimum(eps, r) / (r + 1e-12)
  return jnp.clip(x + d * bcast(scale, d), 0.0, 1.0)


def project_l1(x_adv, x, eps, n_bisect: int = 40):
  """The Euclidean projection of x_adv onto {z : ||z - x||_1 <= eps, 0 <= z <= 1} (x in [0, 1]).

  Per example the problem separates given the multiplier lambda >= 0 of the L1 constraint: d_i =
  clip(soft_threshold(v_i, lambda), -x_i, 1 - x_i), v = x_adv - x. ||d(lambda)||_1 falls with lambda, so
  lambda is found by bisection (n_bisect halvings of [0, max |v|]), keeping the upper end: the point
  returned always lies in the ball.
  """
  v = (x_adv - x).reshape(x.shape[0], -1)
  lo, hi = -x.reshape(v.shape), 1.0 - x.reshape(v.shape)

  def d_of(lam):
    return jnp.clip(jnp.sign(v) * jnp.maximum(jnp.abs(v) - lam[:, None], 0.0), lo, hi)

  def l1_of(lam):
    return jnp.sum(jnp.abs(d_of(lam)), axis=1)

  n = v.shape[0]
  inside = l1_of(jnp.zeros((n,), v.dtype)) <= eps

  def halve(_, bounds):
    a, b = bounds
    mid = 0.5 * (a + b)
    ok = l1_of(mid) <= eps
    return jnp.where(ok, a, mid), jnp.where(ok, mid, b)

  a, b = jax.lax.fori_loop(0, n_bisect, halve, (jnp.zeros((n,), v.dtype), jnp.max(jnp.abs(v), axis=1)))
  lam = jnp.where(inside, 0.0, b)
  return x + d_of(lam).reshape(x.shape)


def project_ball(x_adv, x, eps, norm: str):
  """x_adv moved into the eps-ball of `norm` around x and into [0, 1] (the attacks' projection)."""
  if norm == 'Linf':
    return project(x_adv, x, eps)
  if norm == 'L2':
    return project_l2(x_adv, x, eps)
  if norm == 'L1':
    return project_l1(x_adv, x, eps)
  raise ValueError(norm)
