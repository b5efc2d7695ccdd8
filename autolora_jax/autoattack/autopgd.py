"""Auto-PGD (APGD, Croce & Hein 2020) under an L-infinity, L2 or L1 budget: APGD-CE, APGD-DLR, APGD-T.

The rules follow the original AutoAttack release:

* start: L-infinity x + eps * u / max|u|, u ~ U(-1, 1)^d; L2 x + eps * g / ||g||_2, g ~ N(0, I); L1 the
  projection of x + g onto the L1 ball and the box; clipped to [0, 1];
* step (L-infinity and L2): z = P(x_k + eta * s), s = sign(grad) (L-infinity) or grad / ||grad||_2 (L2),
  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})) with momentum a = 0.75 (a = 1 at the first
  step), eta starting at 2 eps, P the projection onto the ball and [0, 1];
* step-size checks (the paper's "checkpoints") at 22%, 41%, 57%, 70%, 80%, 87%, 93%, 99% of the
  iterations (`step_size_checks`): at each, an example's step size halves and it restarts from its best
  point if its loss rose in at most rho = 75% of the steps since the last check, or if its step size was
  not halved at the last check and its best loss has not improved since;
* L1 ("Mind the box", Croce & Hein 2021): the step moves the coordinates with the largest gradient
  entries only, x_{k+1} = P(x_k + eta * sign(g_s) / ||sign(g_s)||_1), g_s the gradient outside the top
  fraction `topk` of |grad| set to 0 (no momentum), P the exact projection onto the L1 ball intersected
  with the box; eta starts at eps; every max(int(0.04 n), 1) steps, with s the number of coordinates the
  best point has moved: if s fell below 95% of its value at the last check, eta resets to eps and the
  example restarts from its best point, else eta /= 1.5 (at least eps / 10); topk = s / (1.5 d);
* the standard L1 version runs APGD with `use_largereps`: 30% of the iterations at 3 eps, 30% at 2 eps,
  40% at eps, each stage starting where the previous one's best point lies (projected);
* with a randomised model (`model_key`), every gradient is the mean over `eot_iter` calls
  (expectation over transformation; the 'rand' version: 20);
* the result of an example is the last iterate that was misclassified (if any).

Each function is pure and jittable over `logits_fn(x) -> logits` (or `logits_fn(x, key)` with
`model_key`); all shapes are static, and an `active` mask marks the examples to attack (the rest are
returned unchanged and never count as fooled).
"""

from __future__ import annotations

import math
from typing import Callable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from autolora_jax.autoattack import common

LOSSES = ('ce', 'dlr', 'dlr-targeted')
NORMS = ('Linf', 'L2', 'L1')


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


def l1_checks(n_iter: int) -> List[int]:
  """The iterations (0-based) at which L1 APGD adapts its step size and sparsity: every
  max(int(0.04 n), 1) steps."""
  k = max(int(0.04 * n_iter), 1)
  return [i for i in range(n_iter) if (i + 1) % k == 0]


def largereps_schedule(eps: float, n_iter: int) -> List[Tuple[float, int]]:
  """The standard L1 version's (eps, iterations) stages: 3 eps, 2 eps, eps for 30%, 30%, 40% (rounded up,
  the last stage takes the rest)."""
  iters = [math.ceil(0.3 * n_iter), math.ceil(0.3 * n_iter)]
  iters.append(n_iter - sum(iters))
  return [(3.0 * eps, iters[0]), (2.0 * eps, iters[1]), (1.0 * eps, iters[2])]


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


def _l0(d):
  return jnp.sum((d.reshape(d.shape[0], -1) != 0).astype(jnp.float32), axis=1)


def _loss_and_grad(logits_fn, loss_fn, model_key, eot_iter):
  """(x_adv, i) -> (loss (N,), logits, grad); with a model key, the gradient is the mean over eot_iter
  calls of logits_fn(x, key) (key folded from model_key, the iteration and the call), loss and logits
  those of the last call, as in the original."""
  def one(z, key):
    def total(u):
      logits = logits_fn(u) if key is None else logits_fn(u, key)
      per = loss_fn(logits)
      return per.sum(), (per, logits)
    (_, (per, logits)), grad = jax.value_and_grad(total, has_aux=True)(z)
    return per, logits, grad

  if model_key is None:
    return lambda z, i: one(z, None)

  def averaged(z, i):
    k = jax.random.fold_in(model_key, i)
    per, logits, grad = one(z, jax.random.fold_in(k, 0))
    if eot_iter > 1:
      def more(e, acc):
        _, _, g = one(z, jax.random.fold_in(k, e))
        return acc + g
      grad = lax.fori_loop(1, eot_iter, more, grad)
    return per, logits, grad / float(eot_iter)
  return averaged


def _run(loss_and_grad, x, y, x_adv, *, eps, n_iter: int, rho: float, norm: str, active, from_init: bool,
         early_stop: bool = True, call_offset: int = 0):
  """One APGD run from x_adv; returns (x_best, x_best_adv, fooled) (x_best: the highest-loss point)."""
  n = x.shape[0]
  n_fts = int(np.prod(x.shape[1:]))
  loss0, logits0, grad0 = loss_and_grad(x_adv, call_offset)
  fooled0 = ~common.correct(logits0, y)
  alpha = 1.0 if norm == 'L1' else 2.0

  is_check = np.zeros(n_iter, bool)
  window = np.zeros(n_iter, np.int32)
  if norm == 'L1':
    is_check[l1_checks(n_iter)] = True
  else:
    for i, k in step_size_checks(n_iter):
      is_check[i], window[i] = True, k
  is_check, window = jnp.asarray(is_check), jnp.asarray(window)
  lags = jnp.arange(n_iter)
  if norm == 'L1':
    sp0 = _l0(x_adv - x) if from_init else jnp.full((n,), float(n_fts))
    topk0 = sp0 / n_fts / 1.5 if from_init else jnp.full((n,), 0.2)
  else:
    sp0 = topk0 = jnp.zeros((n,))

  init = dict(i=jnp.int32(0), x_adv=x_adv, x_old=x_adv, grad=grad0, x_best=x_adv, grad_best=grad0,
              loss_best=loss0, x_best_adv=x_adv, fooled=fooled0,
              step=jnp.full((n,), alpha * eps, jnp.float32),
              # Loss history; unwritten rows stay 0. As in the original, the first check also compares the
              # first loss with the (still zero) last row.
              history=jnp.zeros((n_iter, n), jnp.float32), loss_best_last=loss0,
              reduced_last=jnp.ones((n,), bool), topk=topk0, sp_old=sp0)

  def body(s):
    i = s['i']
    step = common.bcast(s['step'], x)
    if norm == 'Linf':
      a = jnp.where(i > 0, 0.75, 1.0)
      z = common.project(s['x_adv'] + step * jnp.sign(s['grad']), x, eps)
      x_new = common.project(s['x_adv'] + a * (z - s['x_adv']) + (1.0 - a) * (s['x_adv'] - s['x_old']), x,
                             eps)
    elif norm == 'L2':
      a = jnp.where(i > 0, 0.75, 1.0)
      z = common.project_l2(s['x_adv'] + step * common.normalize(s['grad'], 'L2'), x, eps)
      x_new = common.project_l2(s['x_adv'] + a * (z - s['x_adv']) + (1.0 - a) * (s['x_adv'] - s['x_old']),
                                x, eps)
    else:  # L1: a sparse step, no momentum
      g = jnp.abs(s['grad']).reshape(n, -1)
      rank = jnp.clip(jnp.floor((1.0 - s['topk']) * n_fts), 0, n_fts - 1).astype(jnp.int32)
      thr = jnp.take_along_axis(jnp.sort(g, axis=1), rank[:, None], axis=1)[:, 0]
      sg = jnp.sign(s['grad'] * (jnp.abs(s['grad']) >= common.bcast(thr, x)))
      x_new = common.project_l1(s['x_adv'] + step * sg / (common.bcast(common.lp(sg, 'L1'), x) + 1e-10), x,
                                eps)
    per, logits, grad = loss_and_grad(x_new, call_offset + i + 1)
    wrong = ~common.correct(logits, y)
    fooled = s['fooled'] | wrong
    x_best_adv = jnp.where(common.bcast(wrong, x), x_new, s['x_best_adv'])
    history = s['history'].at[i].set(per)
    better = per > s['loss_best']
    mb = common.bcast(better, x)
    x_best = jnp.where(mb, x_new, s['x_best'])
    grad_best = jnp.where(mb, grad, s['grad_best'])
    loss_best = jnp.where(better, per, s['loss_best'])
    check = is_check[i]
    topk, sp_old = s['topk'], s['sp_old']
    if norm == 'L1':
      sp = _l0(x_best - x)
      reduce = check & (sp / jnp.maximum(sp_old, 1e-12) < 0.95)
      new_step = jnp.clip(jnp.where(reduce, alpha * eps, s['step'] / 1.5), alpha * eps / 10.0, alpha * eps)
      step_out = jnp.where(check, new_step, s['step'])
      topk = jnp.where(check, sp / n_fts / 1.5, topk)
      sp_old = jnp.where(check, sp, sp_old)
      loss_best_last, reduced_last = s['loss_best_last'], s['reduced_last']
    else:
      # Step-size check (a no-op between checks).
      k = window[i]
      rows = jnp.mod(i - lags, n_iter)
      prev = jnp.mod(i - lags - 1, n_iter)
      rises = jnp.sum((history[rows] > history[prev]) & (lags < k)[:, None], axis=0)
      oscillating = rises <= k * rho
      no_gain = ~s['reduced_last'] & (s['loss_best_last'] >= loss_best)
      reduce = check & (oscillating | no_gain)
      step_out = jnp.where(reduce, 0.5 * s['step'], s['step'])
      loss_best_last = jnp.where(check, loss_best, s['loss_best_last'])
      reduced_last = jnp.where(check, reduce, s['reduced_last'])
    mr = common.bcast(reduce, x)
    return dict(
        i=i + 1, x_adv=jnp.where(mr, x_best, x_new), x_old=s['x_adv'], grad=jnp.where(mr, grad_best, grad),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_best_adv=x_best_adv, fooled=fooled,
        step=step_out, history=history, loss_best_last=loss_best_last, reduced_last=reduced_last, topk=topk,
        sp_old=sp_old)

  def cond(s):
    more = s['i'] < n_iter
    return more & jnp.any(active & ~s['fooled']) if early_stop else more

  s = lax.while_loop(cond, body, init)
  return s['x_best'], s['x_best_adv'], s['fooled'] & active


def random_start(key_rows, x, eps, norm: str):
  """APGD's random start per example (see the module docstring), in the ball and the box."""
  if norm == 'Linf':
    u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32, -1.0, 1.0))(key_rows)
    return jnp.clip(x + eps * u / (common.bcast(common.linf(u), u) + 1e-12), 0.0, 1.0)
  g = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(key_rows)
  if norm == 'L2':
    return jnp.clip(x + eps * common.normalize(g, 'L2'), 0.0, 1.0)
  return common.project_l1(x + g, x, eps)


def apgd(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, loss='ce', rho: float = 0.75,
         target=None, active=None, norm: str = 'Linf', use_largereps: bool = False, eot_iter: int = 1,
         model_key=None):
  """One run of APGD that maximises `loss` under the `norm` budget eps.

  Args:
    logits_fn: maps images (N, H, W, C) in [0, 1] to logits (N, K); with `model_key`, a randomised model
      `logits_fn(x, key)`.
    x: clean images (N, H, W, C) in [0, 1]. y: labels (N,).
    key: a PRNG key, or one per example (N, 2), for the random start.
    eps: the radius. n_iter: iterations (static). rho: the step-size check threshold (L-infinity, L2).
    loss: 'ce', 'dlr', 'dlr-targeted' (with `target`, (N,) target classes), or any function
      logits (N, K) -> per-example loss (N,).
    active: (N,) bool, the examples to attack (default all).
    norm: 'Linf', 'L2' or 'L1'. use_largereps: the L1 schedule 3 eps, 2 eps, eps (`largereps_schedule`).
    eot_iter: gradients averaged per step over this many calls of a randomised model (needs model_key).
    model_key: None for a deterministic `logits_fn(x)`; a PRNG key for a randomised `logits_fn(x, key)`.
  Returns:
    (x_adv, fooled): x_adv in the ball and [0, 1] (x itself where nothing was found or inactive) and the
    (N,) bool of examples misclassified at some iterate.
  """
  common.check_norm(norm, NORMS, 'APGD')
  if use_largereps and norm != 'L1':
    raise ValueError('use_largereps is the L1 schedule of the original; norm is ' + repr(norm))
  loss_fn = loss if callable(loss) else named_loss(loss, y, target)
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  active = common.set_active(active, n)
  keys = common.row_keys(key, n)
  loss_and_grad = _loss_and_grad(logits_fn, loss_fn, model_key, int(eot_iter))
  if not use_largereps:
    x_adv = random_start(keys, x, eps, norm)
    _, x_best_adv, fooled = _run(loss_and_grad, x, y, x_adv, eps=eps, n_iter=n_iter, rho=rho, norm=norm,
                                 active=active, from_init=False)
  else:
    g = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
    stages = largereps_schedule(1.0, n_iter)
    x_init = common.project_l1(x + g, x, stages[0][0] * eps)
    offset = 0
    for j, (factor, iters) in enumerate(stages):
      last = j == len(stages) - 1
      x_init = common.project_l1(x_init, x, factor * eps)
      x_init, x_best_adv, fooled = _run(loss_and_grad, x, y, x_init, eps=factor * eps, n_iter=iters, rho=rho,
                                        norm=norm, active=active, from_init=True, early_stop=last,
                                        call_offset=offset)
      offset += iters + 1
  return jnp.where(common.bcast(fooled, x), x_best_adv, x), fooled


def apgd_ce(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75,
            active=None, norm: str = 'Linf', use_largereps: bool = False, loss: str = 'ce', eot_iter: int = 1,
            model_key=None):
  """APGD on the cross-entropy (loss='dlr': APGD-DLR); each restart attacks only the examples not yet
  fooled. Returns (x_adv, fooled) as `apgd`."""
  x = jnp.asarray(x, jnp.float32)

  def once(r, rk, active_r):
    mk = None if model_key is None else jax.random.fold_in(model_key, r)
    return apgd(logits_fn, x, y, rk, eps=eps, n_iter=n_iter, loss=loss, rho=rho, active=active_r, norm=norm,
                use_largereps=use_largereps, eot_iter=eot_iter, model_key=mk)

  return common.with_restarts(once, x, key, n_restarts, active)


def apgd_t(logits_fn: Callable, x, y, key, *, eps, n_iter: int = 100, n_target_classes: int = 9,
           first_target=2, rho: float = 0.75, active=None, norm: str = 'Linf', use_largereps: bool = False):
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
                           target=target, active=active & ~fooled, norm=norm, use_largereps=use_largereps)
    return t + 1, jnp.where(common.bcast(fooled_t, x), adv_t, x_adv), fooled | fooled_t

  def cond(s):
    t, _, fooled = s
    return (t < n_t) & jnp.any(active & ~fooled)

  _, x_adv, fooled = lax.while_loop(cond, body, (jnp.int32(0), x, jnp.zeros((n,), bool)))
  return x_adv, fooled
