"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020), targeted (FAB-T) and untargeted, under an
L-infinity, L2 or L1 norm, as in AutoAttack.

FAB looks for the smallest perturbation that changes the decision. Per iteration, for the target class t:

* linearise g(z) = z_t - z_y at the current point x1: the boundary is the hyperplane w.z = b with
  w = grad g(x1), b = w.x1 - g(x1);
* project both x1 and the clean x0 onto that hyperplane inside the box [0, 1]^d (the smallest step in the
  attack's norm: `project_to_hyperplane` for L-infinity, `project_to_hyperplane_l2`,
  `project_to_hyperplane_l1`), giving d1 and d2;
* mix: alpha = min(||d1|| / (||d1|| + ||d2||), alpha_max),
  x1 <- clip((x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha);
* if x1 is misclassified: remember it if it is the closest adversarial point so far, then step back towards
  x0: x1 <- x0 + beta (x1 - x0).

The untargeted FAB (the 'plus' version) linearises every z_k - z_y and takes the hyperplane closest in the
dual norm. AutoAttack's FAB-T runs one restart without a random start (so it draws nothing), 100
iterations, alpha_max = 0.1, eta = 1.05, beta = 0.9, nine target classes; its untargeted FAB runs 5
restarts, each after the first from a random point at eps / 2; an example counts as broken only if its
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


def _oriented(t, w, b):
  """(w, c, room, lowering_up): w flipped so that w.t >= b, c = w.t - b >= 0 (how far w.z must fall),
  room the distance to the box edge in the lowering direction, lowering_up where that is upwards."""
  sign = jnp.where(jnp.sum(w * t, axis=1) >= b, 1.0, -1.0)
  w = w * sign[:, None]
  c = jnp.sum(w * t, axis=1) - b * sign
  lowering_up = w < 0
  return w, c, jnp.where(lowering_up, 1.0 - t, t), lowering_up


def project_to_hyperplane_l2(t, w, b):
  """Smallest L2 step d per row with w.(t + d) = b and t + d in [0, 1]^D (rows as `project_to_hyperplane`).

  The minimiser is d_i = -clip(lambda w_i) to the box room for one lambda >= 0; the fall of w.z,
  g(lambda) = sum_i |w_i| min(lambda |w_i|, p_i), is piecewise linear with breakpoints p_i / |w_i|: sort
  them and solve the linear piece that reaches c. Unreachable inside the box: the box corner closest to the
  hyperplane.
  """
  w, c, room, lowering_up = _oriented(t, w, b)
  aw = jnp.abs(w)
  bp = jnp.where(aw > 0, room / jnp.where(aw > 0, aw, 1.0), jnp.inf)
  order = jnp.argsort(bp, axis=1)
  bp_s = jnp.take_along_axis(bp, order, axis=1)
  a_s = jnp.take_along_axis(aw, order, axis=1)
  r_s = jnp.take_along_axis(room, order, axis=1)
  ar, a2 = a_s * r_s, a_s * a_s
  clipped = jnp.cumsum(ar, axis=1) - ar  # sum of |w| p over the breakpoints before j
  linear = jnp.sum(a2, axis=1, keepdims=True) - (jnp.cumsum(a2, axis=1) - a2)  # sum of w^2 from j on
  total = jnp.sum(ar, axis=1)
  g_at = jnp.where(jnp.isfinite(bp_s), clipped + jnp.where(jnp.isfinite(bp_s), bp_s, 0.0) * linear,
                   total[:, None])
  j = jnp.clip(jnp.sum(g_at < c[:, None], axis=1), 0, t.shape[1] - 1)
  c_j = jnp.take_along_axis(clipped, j[:, None], axis=1)[:, 0]
  q_j = jnp.take_along_axis(linear, j[:, None], axis=1)[:, 0]
  lam = jnp.maximum((c - c_j) / jnp.where(q_j > 0, q_j, 1.0), 0.0)
  feasible = c <= total
  step = jnp.where(feasible[:, None], jnp.minimum(lam[:, None] * aw, room), room)
  return jnp.where(lowering_up, step, -step) * (w != 0)


def project_to_hyperplane_l1(t, w, b):
  """Smallest L1 step d per row with w.(t + d) = b and t + d in [0, 1]^D (rows as `project_to_hyperplane`).

  A fractional knapsack: the coordinates with the largest |w_i| move first, each as far as the box allows
  (|w_i| p_i of the fall c per coordinate), until w.z has fallen by c; the last one moves part way.
  Unreachable inside the box: the box corner closest to the hyperplane.
  """
  w, c, room, lowering_up = _oriented(t, w, b)
  aw = jnp.abs(w)
  order = jnp.argsort(-aw, axis=1)
  a_s = jnp.take_along_axis(aw, order, axis=1)
  r_s = jnp.take_along_axis(room, order, axis=1)
  cum = jnp.cumsum(a_s * r_s, axis=1)
  j = jnp.clip(jnp.sum(cum < c[:, None], axis=1), 0, t.shape[1] - 1)
  before = jnp.take_along_axis(cum - a_s * r_s, j[:, None], axis=1)[:, 0]
  a_j = jnp.take_along_axis(a_s, j[:, None], axis=1)[:, 0]
  part = jnp.maximum(c - before, 0.0) / jnp.where(a_j > 0, a_j, 1.0)
  idx = jnp.arange(t.shape[1])[None, :]
  step_s = jnp.where(idx < j[:, None], r_s, jnp.where(idx == j[:, None], jnp.minimum(part[:, None], r_s), 0.0))
  step = jnp.take_along_axis(step_s, jnp.argsort(order, axis=1), axis=1)
  feasible = c <= cum[:, -1]
  step = jnp.where(feasible[:, None], step, room)
  return jnp.where(lowering_up, step, -step) * (w != 0)


HYPERPLANE = {'Linf': project_to_hyperplane, 'L2': project_to_hyperplane_l2, 'L1': project_to_hyperplane_l1}
DUAL = {'Linf': 'L1', 'L2': 'L2', 'L1': 'Linf'}
NORMS = ('Linf', 'L2', 'L1')


def fab_single(logits_fn: Callable, x, y, key=None, *, eps, norm: str = 'Linf', target=None,
               rand_start=False, n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05,
               beta: float = 0.9, active=None):
  """One FAB run: targeted at `target` ((N,) classes) or untargeted (target=None: the closest linearised
  boundary among all classes, which needs the Jacobian of the logits).

  rand_start (may be traced): start at a random point at eps / 2 (the original's restarts after the first)
  rather than at x; needs `key`. Returns (x_adv, fooled) as `fab_t`.
  """
  common.check_norm(norm, NORMS, 'FAB')
  project_fn = HYPERPLANE[norm]
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  flat = x.reshape(n, -1)
  active = common.set_active(active, n)
  clean_logits = logits_fn(x)
  todo = active & common.correct(clean_logits, y)  # FAB attacks correctly classified points only
  num_classes = clean_logits.shape[-1]
  u = jnp.arange(n)

  if target is not None:
    def boundary(x1):
      def g(z):
        logits = logits_fn(z)
        return jnp.sum(logits[u, target] - logits[u, y]), logits
      (_, logits), grad = jax.value_and_grad(g, has_aux=True)(x1)
      return logits[u, target] - logits[u, y], grad.reshape(n, -1)
  else:
    def boundary(x1):
      logits, vjp = jax.vjp(logits_fn, x1)
      jac = jax.vmap(lambda k: vjp(jnp.broadcast_to(jax.nn.one_hot(k, num_classes), logits.shape))[0])(
          jnp.arange(num_classes))  # (K, N, ...)
      jac = jnp.moveaxis(jac, 0, 1).reshape(n, num_classes, -1)
      df = logits - logits[u, y][:, None]
      dg = jac - jac[u, y][:, None, :]
      df = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), 1e10, df)
      dual = DUAL[norm]
      size = (jnp.sum(jnp.abs(dg), -1) if dual == 'L1' else jnp.sqrt(jnp.sum(dg * dg, -1)) if dual == 'L2'
              else jnp.max(jnp.abs(dg), -1))
      k = jnp.argmin(jnp.abs(df) / (size + 1e-12), axis=1)
      return df[u, k], dg[u, k]

  if key is not None:
    keys = common.row_keys(key, n)
    if norm == 'Linf':
      r = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32, -1.0, 1.0))(keys)
    else:
      r = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
    start = jnp.clip(x + 0.5 * eps * common.normalize(r, norm), 0.0, 1.0)
    x_start = jnp.where(rand_start, start, x)
  else:
    x_start = x

  def body(s):
    i, x1, best, best_norm = s
    df, w = boundary(x1)
    b = jnp.sum(w * x1.reshape(n, -1), axis=1) - df
    d = project_fn(jnp.concatenate([x1.reshape(n, -1), flat]), jnp.concatenate([w, w]),
                   jnp.concatenate([b, b]))
    d1, d2 = d[:n], d[n:]
    a = jnp.maximum(common.lp(d, norm), 1e-8)
    a1, a2 = a[:n], a[n:]
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x1f = jnp.clip((x1.reshape(n, -1) + eta * d1) * (1.0 - alpha) + (flat + eta * d2) * alpha, 0.0, 1.0)
    x1 = x1f.reshape(x.shape)
    adv = ~common.correct(logits_fn(x1), y) & todo
    dist = common.lp(x1 - x, norm)
    closer = adv & (dist < best_norm)
    best = jnp.where(common.bcast(closer, x), x1, best)
    best_norm = jnp.where(closer, dist, best_norm)
    x1 = jnp.where(common.bcast(adv, x), x + beta * (x1 - x), x1)
    return i + 1, x1, best, best_norm

  def cond(s):
    i, _, _, best_norm = s
    return (i < n_iter) & jnp.any(todo & (best_norm > eps))

  _, _, best, best_norm = lax.while_loop(cond, body, (jnp.int32(0), x_start, x, jnp.full((n,), jnp.inf)))
  found = todo & (best_norm <= eps)
  return jnp.where(common.bcast(found, x), best, x), found


def fab_t(logits_fn: Callable, x, y, key=None, *, eps, n_iter: int = 100, n_target_classes: int = 9,
          first_target=2, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, active=None,
          norm: str = 'Linf'):
  """Targeted FAB, one run per target class on the examples not yet broken.

  Args:
    logits_fn: maps images (N, H, W, C) in [0, 1] to logits (N, K).
    x, y: clean images in [0, 1] and labels. key: unused (no random start, as in AutoAttack), accepted so
      that every attack has the same signature.
    eps: an example counts as broken only by an adversarial point within eps (in `norm`).
    n_target_classes, first_target: the targets are the classes ranked first_target, first_target + 1, ...
      by the clean logits (at most K - 1 of them); first_target may be traced.
    alpha_max, eta, beta: FAB's step parameters (the original's defaults).
    active: (N,) bool, the examples to attack. norm: 'Linf', 'L2' or 'L1'.
  Returns:
    (x_adv, fooled): the closest adversarial point found within eps (x where none), and the (N,) bool of
    examples with one.
  """
  del key
  common.check_norm(norm, NORMS, 'FAB-T')
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  active = common.set_active(active, n)
  clean_logits = logits_fn(x)
  num_classes = clean_logits.shape[-1]
  n_t = common.num_targets(n_target_classes, num_classes)
  first_target = jnp.asarray(first_target, jnp.int32)

  def cond(s):
    t, _, fooled = s
    return (t < n_t) & jnp.any(active & ~fooled)

  def body(s):
    t, x_adv, fooled = s
    target = common.ranked_class(clean_logits, jnp.minimum(first_target + t, num_classes))
    adv_t, found = fab_single(logits_fn, x, y, eps=eps, norm=norm, target=target, n_iter=n_iter,
                              alpha_max=alpha_max, eta=eta, beta=beta, active=active & ~fooled)
    return t + 1, jnp.where(common.bcast(found, x), adv_t, x_adv), fooled | found

  _, x_adv, fooled = lax.while_loop(cond, body, (jnp.int32(0), x, jnp.zeros((n,), bool)))
  return x_adv, fooled


def fab(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, n_restarts: int = 5,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, active=None, norm: str = 'Linf'):
  """Untargeted FAB with restarts (the 'plus' version's): restart r > 0 starts at a random point at eps / 2
  and runs on the examples not yet broken. Returns (x_adv, fooled) as `fab_t`."""
  common.check_norm(norm, NORMS, 'FAB')
  x = jnp.asarray(x, jnp.float32)

  def once(r, rk, active_r):
    return fab_single(logits_fn, x, y, rk, eps=eps, norm=norm, rand_start=r > 0, n_iter=n_iter,
                      alpha_max=alpha_max, eta=eta, beta=beta, active=active_r)

  return common.with_restarts(once, x, key, n_restarts, active)
