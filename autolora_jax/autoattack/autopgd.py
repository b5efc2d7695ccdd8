"""Auto-PGD (APGD, Croce & Hein 2020) under an L-infinity budget: APGD-CE and APGD-T (targeted DLR).

The rules follow the original AutoAttack release:

* start: x + eps * u / max|u|, u ~ U(-1, 1)^d per example (a random corner-ish point of the ball), clipped;
* step: z = P(x_k + eta * sign(grad)), x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})) with
  momentum a = 0.75 (a = 1 at the first step), eta starting at 2 eps, P the projection onto the ball and
  [0, 1];
* step-size checks (the paper's "checkpoints") at 22%, 41%, 57%, 70%, 80%, 87%, 93%, 99% of the
  iterations (`step_size_checks`): at each, an example's step size halves and it restarts from its best
  point if its loss rose in at most rho = 75% of the steps since the last check, or if its step size was
  not halved at the last check and its best loss has not improved since;
* the result of an example is the last iterate that was misclassified (if any).

Each function is pure and jittable over `logits_fn(x) -> logits`; all shapes are static, and an `active`
mask marks the examples to attack (the rest are returned unchanged and never count as fooled).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from autolora_jax.autoattack import common

LOSSES = ('ce', 'dlr', 'dlr-targeted')


def step_size_checks(n_iter: int) -> List[Tuple[int, int]]:
  """The step-size checks of an n_iter-step run: [(iteration index, window length), ...].

  The first window is max(int(0.22 n), 1) steps long; each following one is shorter by
  max(int(0.03 n), 1) but at least max(int(0.06 n), 1). For n = 100 the checks fall after 22, 41, 57, 70,
  80, 87, 93 and 99 steps.
  """
  first = max(int(0.22 * n_iter), 1)
  decrease, minimum = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
  out, i, k = [], -1, first
  while i + k < n_iter:
    i += k
    out.append((i, k))
    k = max(k - decrease, minimum)
  return out


def named_loss(loss: str, y, target=None) -> Callable:
  """The per-example loss `logits -> (N,)` APGD maximises: 'ce', 'dlr' or 'dlr-targeted' (with target)."""
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}.')
  if loss == 'ce':
    return lambda logits: common.ce_loss(logits, y)
  if loss == 'dlr':
    return lambda logits: common.dlr_loss(logits, y)
  if target is None:
    raise ValueError("loss='dlr-targeted' needs target classes.")
  return lambda logits: common.dlr_targeted_loss(logits, y, target)


def apgd(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, loss='ce', rho: float = 0.75,
         target=None, active=None):
  """One run of L-infinity APGD that maximises `loss`.

  Args:
    logits_fn: maps images (N, H, W, C) in [0, 1] to logits (N, K).
    x: clean images (N, H, W, C) in [0, 1]. y: labels (N,).
    key: a PRNG key, or one per example (N, 2), for the random start.
    eps: L-infinity radius. n_iter: iterations (static). rho: the step-size check threshold.
    loss: 'ce', 'dlr', 'dlr-targeted' (with `target`, (N,) target classes), or any function
      logits (N, K) -> per-example loss (N,).
    active: (N,) bool, the examples to attack (default all).
  Returns:
    (x_adv, fooled): x_adv in the ball and [0, 1] (x itself where nothing was found or inactive) and the
    (N,) bool of examples misclassified at some iterate.
  """
  loss_fn = loss if callable(loss) else named_loss(loss, y, target)
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  active = common.set_active(active, n)
  keys = common.row_keys(key, n)

  def loss_and_grad(x_adv):
    def total(z):
      logits = logits_fn(z)
      per = loss_fn(logits)
      return per.sum(), (per, logits)
    (_, (per, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return per, logits, grad

  u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32, -1.0, 1.0))(keys)
  x_adv = jnp.clip(x + eps * u / (common.bcast(common.linf(u), u) + 1e-12), 0.0, 1.0)
  loss0, logits0, grad0 = loss_and_grad(x_adv)
  fooled0 = ~common.correct(logits0, y)

  table = step_size_checks(n_iter)
  is_check = np.zeros(n_iter, bool)
  window = np.zeros(n_iter, np.int32)
  for i, k in table:
    is_check[i], window[i] = True, k
  is_check, window = jnp.asarray(is_check), jnp.asarray(window)
  lags = jnp.arange(n_iter)

  init = dict(i=jnp.int32(0), x_adv=x_adv, x_old=x_adv, grad=grad0, x_best=x_adv, grad_best=grad0,
              loss_best=loss0, x_best_adv=x_adv, fooled=fooled0, step=jnp.full((n,), 2.0 * eps, jnp.float32),
              # Loss history; unwritten rows stay 0. As in the original, the first check also compares the
              # first loss with the (still zero) last row.
              history=jnp.zeros((n_iter, n), jnp.float32), loss_best_last=loss0,
              reduced_last=jnp.ones((n,), bool))

  def body(s):
    i = s['i']
    a = jnp.where(i > 0, 0.75, 1.0)
    step = common.bcast(s['step'], x)
    z = common.project(s['x_adv'] + step * jnp.sign(s['grad']), x, eps)
    x_new = common.project(s['x_adv'] + a * (z - s['x_adv']) + (1.0 - a) * (s['x_adv'] - s['x_old']), x, eps)
    per, logits, grad = loss_and_grad(x_new)
    wrong = ~common.correct(logits, y)
    fooled = s['fooled'] | wrong
    x_best_adv = jnp.where(common.bcast(wrong, x), x_new, s['x_best_adv'])
    history = s['history'].at[i].set(per)
    better = per > s['loss_best']
    mb = common.bcast(better, x)
    x_best = jnp.where(mb, x_new, s['x_best'])
    grad_best = jnp.where(mb, grad, s['grad_best'])
    loss_best = jnp.where(better, per, s['loss_best'])

    # Step-size check (a no-op between checks).
    k = window[i]
    rows = jnp.mod(i - lags, n_iter)
    prev = jnp.mod(i - lags - 1, n_iter)
    rises = jnp.sum((history[rows] > history[prev]) & (lags < k)[:, None], axis=0)
    oscillating = rises <= k * rho
    no_gain = ~s['reduced_last'] & (s['loss_best_last'] >= loss_best)
    reduce = is_check[i] & (oscillating | no_gain)
    mr = common.bcast(reduce, x)
    return dict(
        i=i + 1, x_adv=jnp.where(mr, x_best, x_new), x_old=s['x_adv'], grad=jnp.where(mr, grad_best, grad),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_best_adv=x_best_adv, fooled=fooled,
        step=jnp.where(reduce, 0.5 * s['step'], s['step']), history=history,
        loss_best_last=jnp.where(is_check[i], loss_best, s['loss_best_last']),
        reduced_last=jnp.where(is_check[i], reduce, s['reduced_last']))

  def cond(s):
    return (s['i'] < n_iter) & jnp.any(active & ~s['fooled'])

  s = lax.while_loop(cond, body, init)
  fooled = s['fooled'] & active
  return jnp.where(common.bcast(fooled, x), s['x_best_adv'], x), fooled


def apgd_ce(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75,
            active=None):
  """APGD on the cross-entropy; each restart attacks only the examples not yet fooled.

  Returns (x_adv, fooled) as `apgd`.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  active = common.set_active(active, n)
  keys = common.row_keys(key, n)
  x_adv, fooled = x, jnp.zeros((n,), bool)
  for r in range(n_restarts):
    rk = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)
    adv_r, fooled_r = apgd(logits_fn, x, y, rk, eps=eps, n_iter=n_iter, loss='ce', rho=rho,
                           active=active & ~fooled)
    x_adv = jnp.where(common.bcast(fooled_r, x), adv_r, x_adv)
    fooled = fooled | fooled_r
  return x_adv, fooled


def apgd_t(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, n_target_classes: int = 9,
           first_target=2, rho: float = 0.75, active=None):
  """APGD-T: APGD on the targeted DLR loss, once per target class, each time on the examples not yet fooled.

  The targets are the classes whose clean logits rank first_target, first_target + 1, ... (rank 1 = the
  top class, so the default 2..10 are the nine most likely wrong classes of a correctly classified
  example); at most K - 1 of them. `first_target` may be traced, so a caller can run one target at a time
  without recompiling. Returns (x_adv, fooled) as `apgd`.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  active = common.set_active(active, n)
  keys = common.row_keys(key, n)
  clean_logits = logits_fn(x)
  n_t = common.num_targets(n_target_classes, clean_logits.shape[-1])
  first_target = jnp.asarray(first_target, jnp.int32)

  def body(s):
    t, x_adv, fooled = s
    rank = jnp.minimum(first_target + t, clean_logits.shape[-1])
    target = common.ranked_class(clean_logits, rank)
    tk = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
    adv_t, fooled_t = apgd(logits_fn, x, y, tk, eps=eps, n_iter=n_iter, loss='dlr-targeted', rho=rho,
                           target=target, active=active & ~fooled)
    return t + 1, jnp.where(common.bcast(fooled_t, x), adv_t, x_adv), fooled | fooled_t

  def cond(s):
    t, _, fooled = s
    return (t < n_t) & jnp.any(active & ~fooled)

  _, x_adv, fooled = lax.while_loop(cond, body, (jnp.int32(0), x, jnp.zeros((n,), bool)))
  return x_adv, fooled
