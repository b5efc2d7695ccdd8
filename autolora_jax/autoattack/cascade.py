"""The AutoAttack cascade: `run(logits_fn, x, y, ...)` -> `AutoAttackResult`.

Clean accuracy first; then each attack of the version, in order, only on the points still robust; a
point broken by an attack keeps that attack's adversarial example (the worst case) and is never attacked
again. The targeted attacks (APGD-T, FAB-T) run one target class at a time over all points still robust.

Points are attacked in batches of a fixed size (the last one padded and masked), so each attack compiles
once per run. Every point draws its randomness from its own key, a function of (seed, attack, restart or
target, point index), so the result does not depend on the batch size or on the other attacks run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from autolora_jax.autoattack import autopgd, checks, common, fab, square_attack
from autolora_jax.autoattack.errors import AutoAttackInputError

log = logging.getLogger(__name__)

ATTACKS = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
VERSIONS = {'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'), 'fast': ('apgd-ce', 'apgd-t')}
TARGETED = ('apgd-t', 'fab-t')

# The original's settings for the standard L-infinity version.
DEFAULTS = dict(n_iter=100, n_restarts=1, rho=0.75, n_target_classes=9, n_queries=5000, p_init=0.8,
                alpha_max=0.1, eta=1.05, beta=0.9)


@dataclasses.dataclass
class AutoAttackResult:
  """What `run` found, per point and in total.

  Attributes:
    x_adv: (N, H, W, C) the adversarial example of each broken point (the clean image elsewhere).
    robust: (N,) bool, correctly classified after every attack.
    clean: (N,) bool, correctly classified before any attack.
    fell_to: (N,) str, where each point fell: 'clean' (misclassified unattacked), an attack's name, or ''
      (still robust).
    accuracy: robust accuracy after each stage, in order: {'clean': ..., 'apgd-ce': ..., ...}.
    attacked: per attack, the (N,) bool of points it was run on.
    seconds: wall time per stage.
    version, attacks, eps, seed: the settings.
  """
  x_adv: np.ndarray
  robust: np.ndarray
  clean: np.ndarray
  fell_to: np.ndarray
  accuracy: Dict[str, float]
  attacked: Dict[str, np.ndarray]
  seconds: Dict[str, float]
  version: str
  attacks: Tuple[str, ...]
  eps: float
  seed: int

  @property
  def num_points(self) -> int:
    return int(self.robust.shape[0])

  @property
  def robust_accuracy(self) -> float:
    return float(np.mean(self.robust)) if self.num_points else float('nan')

  @property
  def clean_accuracy(self) -> float:
    return float(np.mean(self.clean)) if self.num_points else float('nan')

  def summary(self) -> dict:
    """A JSON-serialisable summary: settings, accuracies per stage, points broken per attack, seconds."""
    return {'version': self.version, 'attacks': list(self.attacks), 'eps': self.eps, 'seed': self.seed,
            'num_points': self.num_points, 'clean': self.clean_accuracy, 'robust': self.robust_accuracy,
            'accuracy_after': dict(self.accuracy),
            'broken_by': {a: int(np.sum(self.fell_to == a)) for a in self.attacks},
            'seconds': dict(self.seconds)}


def _as_partial(logits_fn):
  """`logits_fn` as a pytree: a `jax.tree_util.Partial` keeps its bound arrays (e.g. model variables) as
  traced arguments rather than compile-time constants; a plain function becomes a Partial without any."""
  return logits_fn if isinstance(logits_fn, jax.tree_util.Partial) else jax.tree_util.Partial(logits_fn)


@jax.jit
def _clean(fn, x, y):
  """Clean predictions and the input gradient of the margin (for the zero-gradient check) of a batch."""
  def total(z):
    logits = fn(z)
    return jnp.sum(common.margin(logits, y)), logits
  (_, logits), grad = jax.value_and_grad(total, has_aux=True)(x)
  zero_grad = jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=1)
  return logits, zero_grad


def _kernel(attack: str) -> str:
  """APGD-CE and APGD-T share one compiled APGD (the loss is chosen by a traced flag)."""
  return 'apgd' if attack in ('apgd-ce', 'apgd-t') else attack


@functools.partial(jax.jit, static_argnames=('kernel', 'options'))
def _attack_batch(fn, x, y, index, active, pass_key, pass_index, targeted, eps, *, kernel: str,
                  options: tuple):
  """One pass of an attack (a restart of APGD-CE, a target class of APGD-T or FAB-T) on a padded batch.

  Returns (x_adv, fooled): fooled = active, misclassified at x_adv and x_adv within the eps-ball; x_adv is
  x wherever fooled is False.
  """
  o = dict(options)
  keys = jax.vmap(lambda i: jax.random.fold_in(pass_key, i))(index)
  rank = 2 + pass_index  # target passes attack the classes ranked 2, 3, ... by the clean logits
  if kernel == 'apgd':
    clean_logits = fn(x)
    if clean_logits.shape[-1] >= 4:
      target = common.ranked_class(clean_logits, jnp.minimum(rank, clean_logits.shape[-1]))
      loss = lambda z: jnp.where(targeted, common.dlr_targeted_loss(z, y, target), common.ce_loss(z, y))
    else:  # the targeted DLR loss needs 4 classes; the cascade skips APGD-T then
      loss = lambda z: common.ce_loss(z, y)
    adv, _ = autopgd.apgd(fn, x, y, keys, eps=eps, n_iter=o['n_iter'], loss=loss, rho=o['rho'],
                          active=active)
  elif kernel == 'fab-t':
    adv, _ = fab.fab_t(fn, x, y, keys, eps=eps, n_iter=o['n_iter'], n_target_classes=1, first_target=rank,
                       alpha_max=o['alpha_max'], eta=o['eta'], beta=o['beta'], active=active)
  elif kernel == 'square':
    adv, _ = square_attack.square(fn, x, y, keys, eps=eps, n_queries=o['n_queries'], p_init=o['p_init'],
                                  active=active)
  else:
    raise ValueError(kernel)
  fooled = active & ~common.correct(fn(adv), y) & (common.linf(adv - x) <= eps + common.BALL_TOL)
  return jnp.where(common.bcast(fooled, x), adv, x), fooled


def _check_inputs(x, y, eps, version, attacks, batch_size):
  if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise AutoAttackInputError(f'autoattack.run needs images x of shape (N, H, W, C) and labels y of shape '
                               f'(N,); got {x.shape} and {y.shape}.')
  if x.size and (x.min() < 0 or x.max() > 1):
    raise AutoAttackInputError(f'autoattack.run needs images in [0, 1]; got values in [{x.min():.3g}, '
                               f'{x.max():.3g}]. Normalise inside logits_fn, not before the attack.')
  if not 0 < eps <= 1:
    raise AutoAttackInputError(f'eps must lie in (0, 1] (images are in [0, 1]), got {eps!r}; e.g. 8/255.')
  if attacks is None and version not in VERSIONS:
    raise AutoAttackInputError(f'version={version!r} is unknown: choose one of {tuple(VERSIONS)}, or pass '
                               f'attacks=... (a sequence of {ATTACKS}) for a custom cascade.')
  if attacks is not None and (not attacks or any(a not in ATTACKS for a in attacks)):
    raise AutoAttackInputError(f'attacks={attacks!r}: give a non-empty sequence of names from {ATTACKS}.')
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise AutoAttackInputError(f'batch_size must be a positive integer, got {batch_size!r}.')


def run(logits_fn: Callable, x, y, *, eps: float = 8 / 255, version: str = 'standard', seed: int = 0,
        batch_size: int = 250, attacks: Optional[Sequence[str]] = None, n_iter: int = DEFAULTS['n_iter'],
        n_restarts: int = DEFAULTS['n_restarts'], rho: float = DEFAULTS['rho'],
        n_target_classes: int = DEFAULTS['n_target_classes'], n_queries: int = DEFAULTS['n_queries'],
        p_init: float = DEFAULTS['p_init'], alpha_max: float = DEFAULTS['alpha_max'],
        eta: float = DEFAULTS['eta'], beta: float = DEFAULTS['beta'], progress: bool = True,
        sanity_checks: bool = True, desc: str = 'AA') -> AutoAttackResult:
  """L-infinity AutoAttack of `logits_fn` on (x, y).

  Args:
    logits_fn: maps images (B, H, W, C) in [0, 1] to logits (B, K); deterministic, in inference mode. Pass
      `jax.tree_util.Partial(f, variables)` (f(variables, x) -> logits) to keep the variables out of the
      compiled code.
    x: images (N, H, W, C) in [0, 1] (numpy or jax). y: integer labels (N,).
    eps: L-infinity radius.
    version: 'standard' (APGD-CE, APGD-T, FAB-T, Square) or 'fast' (APGD-CE, APGD-T).
    seed: the random seed; the same seed gives the same result.
    batch_size: points per attack batch (static shape); the last batch is padded and masked.
    attacks: a custom cascade (names from ATTACKS, in order) instead of `version`.
    n_iter, n_restarts, rho: APGD (and FAB's n_iter). n_target_classes: APGD-T and FAB-T (capped at K - 1).
    n_queries, p_init: Square. alpha_max, eta, beta: FAB. The defaults are the original's (`DEFAULTS`).
    progress: tqdm bars per attack (points done, robust so far).
    sanity_checks: warn (`checks.AutoAttackWarning`) for randomised models, probability outputs, zero
      gradients, too few classes, and Square beating the gradient attacks.
  Returns:
    An `AutoAttackResult`: x_adv, per-point `robust`, where each point fell, accuracy after each stage.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y).astype(np.int32)
  _check_inputs(x, y, eps, version, attacks, batch_size)
  cascade = tuple(attacks) if attacks is not None else VERSIONS[version]
  version = 'custom' if attacks is not None else version
  fn = _as_partial(logits_fn)
  n = x.shape[0]
  bs = int(min(batch_size, max(n, 1)))
  eps_arr = jnp.float32(eps)
  options = {'apgd': (('n_iter', int(n_iter)), ('rho', float(rho))),
             'fab-t': (('alpha_max', float(alpha_max)), ('beta', float(beta)), ('eta', float(eta)),
                       ('n_iter', int(n_iter))),
             'square': (('n_queries', int(n_queries)), ('p_init', float(p_init)))}
  base_key = jax.random.PRNGKey(seed)

  # Clean predictions, and the sanity checks (on the first batch; zero gradients on every point).
  start = time.time()
  pred = np.zeros(n, np.int32)
  zero_grad = np.zeros(n, bool)
  num_classes = 0
  for s in range(0, n, bs):
    idx = np.arange(s, min(s + bs, n))
    pad = np.concatenate([idx, np.full(bs - len(idx), idx[0])])
    logits, zero = _clean(fn, x[pad], y[pad])
    logits = np.asarray(logits)
    pred[idx] = np.argmax(logits, -1)[:len(idx)]
    zero_grad[idx] = np.asarray(zero)[:len(idx)]
    if s == 0:
      num_classes = logits.shape[-1]
      if sanity_checks:
        again = [np.asarray(_clean(fn, x[pad], y[pad])[0]) for _ in range(2)]
        checks.check_randomized([logits] + again, y[pad])
        checks.check_probabilities(logits)
        checks.check_num_classes(num_classes, cascade, n_target_classes)
  if sanity_checks and n:
    checks.check_zero_gradients(zero_grad)
  clean = pred == y
  robust = clean.copy()
  fell_to = np.where(clean, '', 'clean').astype('<U8')
  x_adv = x.copy()
  accuracy = {'clean': float(np.mean(robust)) if n else float('nan')}
  seconds = {'clean': time.time() - start}
  attacked = {}

  for attack in cascade:
    start = time.time()
    was_attacked = np.zeros(n, bool)
    if attack in TARGETED:
      n_passes = common.num_targets(n_target_classes, num_classes)
      if attack == 'apgd-t' and num_classes < 4:
        n_passes = 0  # the targeted DLR loss needs 4 classes (check_num_classes warned)
    else:
      n_passes = int(n_restarts) if attack == 'apgd-ce' else 1  # a restart runs on the points left
    bar = tqdm.tqdm(total=0, desc=f'{desc} {attack}', unit='pt', dynamic_ncols=True, disable=not progress,
                    mininterval=0.5, leave=True)
    try:
      for p in range(n_passes):
        todo = np.flatnonzero(robust)
        if not len(todo):
          break
        bar.total += len(todo)
        if n_passes > 1:
          bar.set_postfix({'robust': f'{int(robust.sum())}/{n}',
                           'target' if attack in TARGETED else 'restart': f'{p + 1}/{n_passes}'})
        bar.refresh()
        # Keyed by the attack's name, not its place: a stage draws the same in any cascade.
        pass_key = jax.random.fold_in(jax.random.fold_in(base_key, ATTACKS.index(attack)), p)
        for s in range(0, len(todo), bs):
          idx = todo[s:s + bs]
          m = len(idx)
          pad = np.concatenate([idx, np.full(bs - m, idx[0])])
          active = np.arange(bs) < m
          kernel = _kernel(attack)
          adv_b, fooled_b = _attack_batch(fn, x[pad], y[pad], pad.astype(np.int32), active, pass_key,
                                          jnp.int32(p), attack == 'apgd-t', eps_arr, kernel=kernel,
                                          options=options[kernel])
          fooled_b = np.asarray(fooled_b)[:m]
          hit = idx[fooled_b]
          x_adv[hit] = np.asarray(adv_b)[:m][fooled_b]
          robust[hit] = False
          fell_to[hit] = attack
          was_attacked[idx] = True
          bar.update(m)
          postfix = {'robust': f'{int(robust.sum())}/{n}'}
          if n_passes > 1:
            postfix['target' if attack in TARGETED else 'restart'] = f'{p + 1}/{n_passes}'
          bar.set_postfix(postfix, refresh=False)
    finally:
      bar.close()
    attacked[attack] = was_attacked
    accuracy[attack] = float(np.mean(robust)) if n else float('nan')
    seconds[attack] = time.time() - start
    log.info('AutoAttack %s: robust accuracy %.2f%% (%d/%d) after %.1f s', attack, 100 * accuracy[attack],
             int(robust.sum()), n, seconds[attack])
  if sanity_checks:
    checks.check_square(accuracy)
  return AutoAttackResult(x_adv=x_adv, robust=robust, clean=clean, fell_to=fell_to, accuracy=accuracy,
                          attacked=attacked, seconds=seconds, version=version, attacks=cascade,
                          eps=float(eps), seed=int(seed))
