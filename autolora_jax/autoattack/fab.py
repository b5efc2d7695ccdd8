"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020), L-infinity, as in AutoAttack.

FAB looks for the smallest perturbation that changes the decision. Per iteration, for the target class t:

* linearise g(z) = z_t - z_y at the current point x1: the boundary is the hyperplane w.z = b with
  w = grad g(x1), b = w.x1 - g(x1);
* project both x1 and the clean x0 onto that hyperplane inside the box [0, 1]^d (smallest L-infinity step,
  `project_to_hyperplane`), giving d1 and d2;
* mix: alpha = min(|d1| / (|d1| + |d2|), alpha_max),
  x1 <- clip((x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha);
* if x1 is misclassified: remember it if it is the closest adversarial point so far, then step back towards
  x0: x1 <- x0 + beta (x1 - x0).

AutoAttack's FAB-T runs one restart without a random start (so it draws nothing), 100 iterations,
alpha_max = 0.1, eta = 1.05, beta = 0.9, nine target classes; an example counts as broken only if its
closest adversarial point lies within eps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from autolora_jax.autoattack import common


def project_to_hyperplane(t, w, b):
  """Smallest L-infinity step d per row with w.(t + d) = b and t + d in [0, 1]^D.

  Args:
    t: points (M, D) in [0, 1]. w: normals (M, D). b: offsets (M,).
  Returns:
    d (M, D). Where the hyperplane cannot be reached inside the box, d moves every coordinate as far as the
    box allows towards it (the box corner closest to the hyperplane). Coordinates with w = 0 do not move.

  With the sign of (w, b) chosen so that w.t >= b, the step must lower w.z by c = w.t - b >= 0; moving
  every coordinate by at most lambda lowers it by at most g(lambda) = sum_i |w_i| min(lambda, p_i), p_i the
  room to the box edge in the lowering direction. g is piecewise linear and increasing: sort p descending,
  find the last breakpoint with g >= c and solve the linear piece there.
  """
  sign = jnp.where(jnp.sum(w * t, axis=1) >= b, 1.0, -1.0)
  w = w * sign[:, None]
  b = b * sign
  c = jnp.sum(w * t, axis=1) - b  # >= 0
  lowering_up = w < 0  # coordinates that lower w.z by increasing
  room = jnp.where(lowering_up, 1.0 - t, t)  # p_i >= 0
  aw = jnp.abs(w)
  order = jnp.argsort(-room, axis=1)
  p_sorted = jnp.take_along_axis(room, order, axis=1)
  w_sorted = jnp.take_along_axis(aw, order, axis=1)
  s = jnp.cumsum(w_sorted, axis=1)  # sum of |w| over the j + 1 largest rooms
  total = jnp.sum(w_sorted * p_sorted, axis=1)
  tail = total[:, None] - jnp.cumsum(w_sorted * p_sorted, axis=1)  # sum of |w| p over the rest
  g_at = p_sorted * s + tail  # g(p_sorted[j]), non-increasing in j
  count = jnp.sum(g_at >= c[:, None], axis=1)
  feasible = (count > 0) & (c <= total)
  j = jnp.clip(count - 1, 0, t.shape[1] - 1)
  s_j = jnp.take_along_axis(s, j[:, None], axis=1)[:, 0]
  tail_j = jnp.take_along_axis(tail, j[:, None], axis=1)[:, 0]
  p_j = jnp.take_along_axis(p_sorted, j[:, None], axis=1)[:, 0]
  lam = jnp.where(s_j > 0, (c - tail_j) / jnp.where(s_j > 0, s_j, 1.0), p_j)
  lam = jnp.maximum(lam, 0.0)
  step = jnp.where(feasible[:, None], jnp.minimum(lam[:, None], room), room)
  d = jnp.where(lowering_up, step, -step)
  return d * (w != 0)


def fab_t(logits_fn: Callable, x, y, key=None, *, eps, n_iter: int = 100, n_target_classes: int = 9,
          first_target=2, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, active=None):
  """Targeted FAB (L-infinity), one run per target class on the examples not yet broken.

  Args:
    logits_fn: maps images (N, H, W, C) in [0, 1] to logits (N, K).
    x, y: clean images in [0, 1] and labels. key: unused (no random start, as in AutoAttack), accepted so
      that every attack has the same signature.
    eps: an example counts as broken only by an adversarial point within eps.
    n_target_classes, first_target: the targets are the classes ranked first_target, first_target + 1, ...
      by the clean logits (at most K - 1 of them); first_target may be traced.
    alpha_max, eta, beta: FAB's step parameters (the original's defaults).
    active: (N,) bool, the examples to attack.
  Returns:
    (x_adv, fooled): the closest adversarial point found within eps (x where none), and the (N,) bool of
    examples with one.
  """
  del key
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  flat = x.reshape(n, -1)
  active = common.set_active(active, n)
  clean_logits = logits_fn(x)
  active = active & common.correct(clean_logits, y)  # FAB attacks correctly classified points only
  num_classes = clean_logits.shape[-1]
  n_t = common.num_targets(n_target_classes, num_classes)
  first_target = jnp.asarray(first_target, jnp.int32)
  u = jnp.arange(n)

  def diff_and_grad(x1, target):
    def g(z):
      logits = logits_fn(z)
      return jnp.sum(logits[u, target] - logits[u, y]), logits
    (_, logits), grad = jax.value_and_grad(g, has_aux=True)(x1)
    return logits[u, target] - logits[u, y], grad

  def one_target(t, x_adv, fooled):
    target = common.ranked_class(clean_logits, jnp.minimum(first_target + t, num_classes))
    todo = active & ~fooled

    def body(s):
      i, x1, best, best_norm = s
      df, dg = diff_and_grad(x1, target)
      w = dg.reshape(n, -1)
      b = jnp.sum(w * x1.reshape(n, -1), axis=1) - df
      d = project_to_hyperplane(jnp.concatenate([x1.reshape(n, -1), flat]), jnp.concatenate([w, w]),
                                jnp.concatenate([b, b]))
      d1, d2 = d[:n], d[n:]
      a = jnp.maximum(common.linf(d), 1e-8)
      a1, a2 = a[:n], a[n:]
      alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
      x1f = jnp.clip((x1.reshape(n, -1) + eta * d1) * (1.0 - alpha) + (flat + eta * d2) * alpha, 0.0, 1.0)
      x1 = x1f.reshape(x.shape)
      adv = ~common.correct(logits_fn(x1), y) & todo
      dist = common.linf(x1 - x)
      closer = adv & (dist < best_norm)
      best = jnp.where(common.bcast(closer, x), x1, best)
      best_norm = jnp.where(closer, dist, best_norm)
      x1 = jnp.where(common.bcast(adv, x), x + beta * (x1 - x), x1)
      return i + 1, x1, best, best_norm

    def cond(s):
      i, _, _, best_norm = s
      return (i < n_iter) & jnp.any(todo & (best_norm > eps))

    _, _, best, best_norm = lax.while_loop(cond, body, (jnp.int32(0), x, x, jnp.full((n,), jnp.inf)))
    found = todo & (best_norm <= eps)
    return jnp.where(common.bcast(found, x), best, x_adv), fooled | found

  def cond(s):
    t, _, fooled = s
    return (t < n_t) & jnp.any(active & ~fooled)

  def body(s):
    t, x_adv, fooled = s
    x_adv, fooled = one_target(t, x_adv, fooled)
    return t + 1, x_adv, fooled

  _, x_adv, fooled = lax.while_loop(cond, body, (jnp.int32(0), x, jnp.zeros((n,), bool)))
  return x_adv, fooled
