"""The AutoAttack cascade: `run(logits_fn, x, y, ...)` -> `AutoAttackResult`.

Clean accuracy first; then each attack of the version, in order, only on the points still robust; a
point broken by an attack keeps that attack's adversarial example (the worst case) and is never attacked
again. The targeted attacks (APGD-T, FAB-T) run one target class at a time over all points still robust.

Points are attacked in batches of at most batch_size, each padded (and masked) to the next bucket
(`buckets`: batch_size and the powers of two from 8 below it), so each attack compiles a handful of
programs and the last few robust points do not run at the full batch. A batch is sharded over the local
devices, the weights replicated once per run. Every point draws its randomness from its own key, a
function of (seed, attack, restart or target, point index), so the result does not depend on the batch
size, the device count or the other attacks run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax import lax

from autolora_jax.autoattack import autopgd, checks, common, fab, square_attack
from autolora_jax.autoattack.errors import AutoAttackInputError

log = logging.getLogger(__name__)

NORMS = common.NORMS
ATTACKS = ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square')
# The norms each attack runs under (the original's).
ATTACK_NORMS = {a: NORMS for a in ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square')}
# The L-infinity cascades of the versions; `version_attacks` gives them per norm.
VERSIONS = {'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'), 'fast': ('apgd-ce', 'apgd-t'),
            'plus': ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'),
            'rand': ('apgd-ce', 'apgd-dlr')}
TARGETED = ('apgd-t', 'fab-t')

# The original's settings for the standard L-infinity version.
DEFAULTS = dict(n_iter=100, n_restarts=1, rho=0.75, n_target_classes=9, n_queries=5000, p_init=0.8,
                alpha_max=0.1, eta=1.05, beta=0.9)


def version_attacks(version: str, norm: str = 'Linf') -> Tuple[str, ...]:
  """The attacks of a version under a norm, in order (every attack runs under every norm, as in the
  original, so this is VERSIONS[version])."""
  attacks = VERSIONS[version]
  return tuple(a for a in attacks if norm in ATTACK_NORMS[a])


def version_settings(version: str, norm: str = 'Linf') -> Dict[str, dict]:
  """Per attack, the original's settings of a version under a norm (its `set_version`):

  * standard: APGD-CE 1 restart, APGD-T 9 targets (L1: APGD-CE 5 restarts and APGD-T 5 targets, both with
    the 3 eps, 2 eps, eps schedule), FAB-T 9 targets, Square 5000 queries;
  * plus: APGD-CE, APGD-DLR and FAB 5 restarts each, Square 5000 queries, APGD-T and FAB-T 9 targets;
  * rand: APGD-CE and APGD-DLR, 1 restart, gradients averaged over 20 calls (EOT);
  * fast (not the original's): APGD-CE and APGD-T as in standard.
  'custom' (a list of attacks) takes the standard settings of the norm.
  """
  l1 = norm == 'L1'
  restarts = {'standard': 5 if l1 else 1, 'fast': 5 if l1 else 1, 'plus': 5, 'rand': 1}[version]
  return {'apgd-ce': dict(n_restarts=restarts, eot_iter=20 if version == 'rand' else 1,
                          use_largereps=l1 and version in ('standard', 'fast')),
          'apgd-dlr': dict(n_restarts=restarts, eot_iter=20 if version == 'rand' else 1, use_largereps=False),
          'apgd-t': dict(n_target_classes=5 if l1 and version in ('standard', 'fast') else 9,
                         use_largereps=l1 and version in ('standard', 'fast')),
          'fab': dict(n_restarts=5), 'fab-t': dict(n_target_classes=9), 'square': dict(n_queries=5000)}


def buckets(batch_size: int, multiple: int = 1, smallest: int = 8) -> Tuple[int, ...]:
  """The padded batch sizes: batch_size and the powers of two from `smallest` below it, each rounded up to
  a multiple of `multiple` (the device count). A batch of m points runs at the smallest bucket >= m."""
  sizes = {batch_size}
  p = smallest
  while p < batch_size:
    sizes.add(p)
    p *= 2
  return tuple(sorted({-(-b // multiple) * multiple for b in sizes}))


def bucket_for(m: int, sizes: Sequence[int]) -> int:
  for b in sizes:
    if b >= m:
      return b
  return sizes[-1]


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
    version, attacks, eps, seed, norm: the settings; settings: per attack, what it ran with (restarts,
      targets, eot_iter, ...).
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
  norm: str = 'Linf'
  settings: Dict[str, dict] = dataclasses.field(default_factory=dict)

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
    return {'version': self.version, 'norm': self.norm, 'attacks': list(self.attacks), 'eps': self.eps,
            'seed': self.seed, 'num_points': self.num_points, 'clean': self.clean_accuracy,
            'robust': self.robust_accuracy, 'accuracy_after': dict(self.accuracy),
            'broken_by': {a: int(np.sum(self.fell_to == a)) for a in self.attacks},
            'settings': {a: dict(v) for a, v in self.settings.items()}, 'seconds': dict(self.seconds)}


class CascadeState(NamedTuple):
  """Where `run` is and what it has found so far: what `on_progress` receives and `resume` continues from.

  The position: `stage` 0 is the clean pass, stage i >= 1 the i-th attack of `attacks`; `pass_index` the
  restart or target pass of that attack (0 in the clean pass); `todo` the positions (in x) of the points the
  pass works through, as they were at its start (the clean pass: all); `start` where in `todo` the next
  batch starts (len(todo): the pass is done).

  The findings: `pred`, `zero_grad` (N,) the clean predictions and zero-gradient flags (filled up to the
  position in the clean pass); `num_classes`; from stage 1 on `robust`, `fell_to` and `x_adv` as in
  `AutoAttackResult` (so far; all False / '' / x in the clean pass); `attacked` per attack begun, the (N,)
  points it was run on so far; `accuracy` after each finished stage; `seconds` per stage (the current one:
  so far). `batch_size`: the largest batch actually run (min(batch_size, N)).

  The arrays are `run`'s own, not copies: they change as the run goes on after the callback returns. Keep a
  state past its callback with `copy()` (or write it out inside the callback); a callback that raises ends
  the run, so the state it was given stays as it is.
  """
  attacks: Tuple[str, ...]
  stage: int
  pass_index: int
  todo: np.ndarray
  start: int
  batch_size: int
  pred: np.ndarray
  zero_grad: np.ndarray
  num_classes: int
  robust: np.ndarray
  fell_to: np.ndarray
  x_adv: np.ndarray
  attacked: Dict[str, np.ndarray]
  accuracy: Dict[str, float]
  seconds: Dict[str, float]

  @property
  def pass_done(self) -> bool:
    """The pass's batches have all run (at its end, or a pass with no points)."""
    return self.start >= len(self.todo)

  def copy(self) -> 'CascadeState':
    """A copy that the run does not change any more."""
    return self._replace(todo=self.todo.copy(), pred=self.pred.copy(), zero_grad=self.zero_grad.copy(),
                         robust=self.robust.copy(), fell_to=self.fell_to.copy(), x_adv=self.x_adv.copy(),
                         attacked={k: v.copy() for k, v in self.attacked.items()},
                         accuracy=dict(self.accuracy), seconds=dict(self.seconds))


def _check_resume(state: CascadeState, cascade: Tuple[str, ...], x: np.ndarray) -> None:
  n = x.shape[0]
  arrays = (state.pred, state.zero_grad, state.robust, state.fell_to)
  if (tuple(state.attacks) != cascade or any(np.shape(a) != (n,) for a in arrays)
      or np.shape(state.x_adv) != x.shape or not 0 <= state.stage <= len(cascade)
      or (len(state.todo) and (np.min(state.todo) < 0 or np.max(state.todo) >= n))
      or any(k not in cascade for k in state.attacked)):
    raise AutoAttackInputError(
        f'resume: the state does not belong to this run (attacks {tuple(state.attacks)} on '
        f'{np.shape(state.robust)[0] if np.ndim(state.robust) else "?"} points; this run: attacks {cascade} on '
        f'{n} points of shape {x.shape[1:]}). Resume with the inputs and settings the state was made with.')


def _as_partial(logits_fn):
  """`logits_fn` as a pytree: a `jax.tree_util.Partial` keeps its bound arrays (e.g. model variables) as
  traced arguments rather than compile-time constants; a plain function becomes a Partial without any."""
  return logits_fn if isinstance(logits_fn, jax.tree_util.Partial) else jax.tree_util.Partial(logits_fn)


def _call(fn, x, model_key):
  return fn(x) if model_key is None else fn(x, model_key)


# XLA compile options for the attacks' programs on the CPU (per program: nothing else in the process
# changes, and no XLA_FLAGS need setting before JAX starts). Empty: `python -m benchmarks.autoattack_speed
# --measure=cascade` found no gain from ops/host.py's convolution setting
# ({'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}) on a small CNN, with or
# without the process-wide flags, within the noise of a shared 2-core machine.
CPU_COMPILER_OPTIONS: Dict[str, str] = {}


def _compiler_options(devices) -> Optional[dict]:
  return dict(CPU_COMPILER_OPTIONS) if devices[0].platform == 'cpu' and CPU_COMPILER_OPTIONS else None


def _clean_impl(fn, x, y, model_key):
  """Clean predictions and the input gradient of the margin (for the zero-gradient check) of a batch."""
  def total(z):
    logits = _call(fn, z, model_key)
    return jnp.sum(common.margin(logits, y)), logits
  (_, logits), grad = jax.value_and_grad(total, has_aux=True)(x)
  zero_grad = jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=1)
  return logits, zero_grad


def _kernel(attack: str) -> str:
  """APGD-CE, APGD-DLR and APGD-T share one compiled APGD (the loss is chosen by a traced flag)."""
  return 'apgd' if attack.startswith('apgd') else attack


LOSS_ID = {'apgd-ce': 0, 'apgd-dlr': 1, 'apgd-t': 2}


def _attack_batch_impl(fn, x, y, index, active, pass_key, pass_index, loss_id, eps, model_key, *, kernel: str,
                       options: tuple, norm: str):
  """One pass of an attack (a restart of APGD-CE, APGD-DLR or FAB, a target class of APGD-T or FAB-T) on a
  padded batch.

  Returns (x_adv, fooled): fooled = active, misclassified at x_adv and x_adv within the eps-ball; x_adv is
  x wherever fooled is False.
  """
  o = dict(options)
  keys = jax.vmap(lambda i: jax.random.fold_in(pass_key, i))(index)
  rank = 2 + pass_index  # target passes attack the classes ranked 2, 3, ... by the clean logits
  det = fn if model_key is None else (lambda z: fn(z, model_key))  # FAB and Square: one draw per batch
  if kernel == 'apgd':
    clean_logits = _call(fn, x, model_key)
    k = clean_logits.shape[-1]
    losses = [lambda z: common.ce_loss(z, y)]
    if k >= 3:
      losses.append(lambda z: common.dlr_loss(z, y))
    if k >= 4:
      target = common.ranked_class(clean_logits, jnp.minimum(rank, k))
      losses.append(lambda z: common.dlr_targeted_loss(z, y, target))
    loss = lambda z: lax.switch(jnp.minimum(loss_id, len(losses) - 1), losses, z)
    adv, _ = autopgd.apgd(fn, x, y, keys, eps=eps, n_iter=o['n_iter'], loss=loss, rho=o['rho'], active=active,
                          norm=norm, use_largereps=o['use_largereps'] and norm == 'L1',
                          eot_iter=o['eot_iter'], model_key=model_key)
  elif kernel == 'fab-t':
    adv, _ = fab.fab_t(det, x, y, keys, eps=eps, n_iter=o['n_iter'], n_target_classes=1, first_target=rank,
                       alpha_max=o['alpha_max'], eta=o['eta'], beta=o['beta'], active=active, norm=norm)
  elif kernel == 'fab':
    adv, _ = fab.fab_single(det, x, y, keys, eps=eps, norm=norm, rand_start=pass_index > 0, n_iter=o['n_iter'],
                            alpha_max=o['alpha_max'], eta=o['eta'], beta=o['beta'], active=active)
  elif kernel == 'square':
    adv, _ = square_attack.square(det, x, y, keys, eps=eps, n_queries=o['n_queries'], p_init=o['p_init'],
                                  active=active, norm=norm)
  else:
    raise ValueError(kernel)
  fooled = active & ~common.correct(_call(fn, adv, model_key), y) & common.in_ball(adv, x, eps, norm)
  return jnp.where(common.bcast(fooled, x), adv, x), fooled


@functools.lru_cache(maxsize=None)
def _jitted(options_items: Optional[tuple]):
  """(clean, attack_batch) compiled with these XLA compile options (one pair per set of options)."""
  opts = dict(options_items) if options_items else None
  return (jax.jit(_clean_impl, compiler_options=opts),
          jax.jit(_attack_batch_impl, static_argnames=('kernel', 'options', 'norm'), compiler_options=opts))


def _clean(fn, x, y, model_key, compiler_options=None):
  return _jitted(tuple(sorted(compiler_options.items())) if compiler_options else None)[0](fn, x, y, model_key)


def _attack_batch(fn, x, y, index, active, pass_key, pass_index, loss_id, eps, model_key, *, kernel: str,
                  options: tuple, norm: str, compiler_options=None):
  """One pass of an attack on a padded batch (`_attack_batch_impl`), compiled with `compiler_options`."""
  run_batch = _jitted(tuple(sorted(compiler_options.items())) if compiler_options else None)[1]
  return run_batch(fn, x, y, index, active, pass_key, pass_index, loss_id, eps, model_key, kernel=kernel,
                   options=options, norm=norm)


def _check_inputs(x, y, eps, version, attacks, batch_size, norm):
  if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise AutoAttackInputError(f'autoattack.run needs images x of shape (N, H, W, C) and labels y of shape '
                               f'(N,); got {x.shape} and {y.shape}.')
  if x.size and (x.min() < 0 or x.max() > 1):
    raise AutoAttackInputError(f'autoattack.run needs images in [0, 1]; got values in [{x.min():.3g}, '
                               f'{x.max():.3g}]. Normalise inside logits_fn, not before the attack.')
  if norm not in NORMS:
    raise AutoAttackInputError(f'norm={norm!r} is unknown: choose one of {NORMS} (the original\'s names).')
  top = {'Linf': 1.0, 'L2': float(np.sqrt(np.prod(x.shape[1:]))), 'L1': float(np.prod(x.shape[1:]))}[norm]
  if not 0 < eps <= top:
    raise AutoAttackInputError(f'eps must lie in (0, {top:.4g}] for norm {norm} on these images (in [0, 1]), '
                               f'got {eps!r}; e.g. 8/255 (Linf), 0.5 (L2 on CIFAR) or 12 (L1 on CIFAR).')
  if attacks is None and version not in VERSIONS:
    raise AutoAttackInputError(f'version={version!r} is unknown: choose one of {tuple(VERSIONS)}, or pass '
                               f'attacks=... (a sequence of {ATTACKS}) for a custom cascade.')
  if attacks is not None and (not attacks or any(a not in ATTACKS for a in attacks)):
    raise AutoAttackInputError(f'attacks={attacks!r}: give a non-empty sequence of names from {ATTACKS}.')
  for a in (attacks or ()):
    if norm not in ATTACK_NORMS[a]:
      raise AutoAttackInputError(f'{a} does not run under norm {norm}: it runs under '
                                 f'{", ".join(ATTACK_NORMS[a])}. Leave it out of attacks=....')
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise AutoAttackInputError(f'batch_size must be a positive integer, got {batch_size!r}.')


def _placement(devices):
  """(put_points, put_replicated, count): shardings of the points over `devices` (a 1-D mesh) and of the
  weights (replicated)."""
  devices = list(devices)
  if len(devices) == 1:
    put = lambda a: jax.device_put(a, devices[0])
    return put, put, 1
  mesh = jax.sharding.Mesh(np.asarray(devices), ('points',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('points'))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (lambda a: jax.device_put(a, rows)), (lambda a: jax.device_put(a, whole)), len(devices)


def run(logits_fn: Callable, x, y, *, eps: float = 8 / 255, norm: str = 'Linf', version: str = 'standard',
        seed: int = 0, batch_size: int = 250, attacks: Optional[Sequence[str]] = None,
        n_iter: int = DEFAULTS['n_iter'], n_restarts: Optional[int] = None, rho: float = DEFAULTS['rho'],
        n_target_classes: Optional[int] = None, n_queries: Optional[int] = None,
        p_init: float = DEFAULTS['p_init'], alpha_max: float = DEFAULTS['alpha_max'],
        eta: float = DEFAULTS['eta'], beta: float = DEFAULTS['beta'], eot_iter: Optional[int] = None,
        randomized: bool = False, devices=None, point_index=None, progress: bool = True,
        sanity_checks: bool = True, desc: str = 'AA', resume: Optional[CascadeState] = None,
        on_progress: Optional[Callable[[CascadeState], None]] = None) -> AutoAttackResult:
  """AutoAttack of `logits_fn` on (x, y) under the `norm` budget eps.

  Args:
    logits_fn: maps images (B, H, W, C) in [0, 1] to logits (B, K); deterministic, in inference mode. Pass
      `jax.tree_util.Partial(f, variables)` (f(variables, x) -> logits) to keep the variables out of the
      compiled code (they are then placed on the devices once per call of `run`). With randomized=True,
      `logits_fn(x, key)` draws its randomness from the PRNG key it is given.
    x: images (N, H, W, C) in [0, 1] (numpy or jax). y: integer labels (N,).
    eps: the radius. norm: 'Linf', 'L2' or 'L1'.
    version: 'standard' (APGD-CE, APGD-T, FAB-T, Square), 'plus' (APGD-CE, APGD-DLR,
      FAB, Square, APGD-T, FAB-T with more restarts), 'rand' (APGD-CE and APGD-DLR with 20 EOT calls per
      gradient, for randomised models) or 'fast' (APGD-CE, APGD-T); `version_settings` has the numbers.
    seed: the random seed; the same seed gives the same result.
    batch_size: the most points per attack batch; a batch of fewer points is padded to the next bucket
      (`buckets`: batch_size and the powers of two from 8 below it, rounded up to the device count).
    attacks: a custom cascade (names from ATTACKS, in order) instead of `version` (version 'custom').
    n_iter, rho: APGD (and FAB's n_iter). n_restarts, n_target_classes, n_queries, eot_iter: override the
      version's settings for every attack that has them (None: the version's; capped at K - 1 targets).
    p_init: Square. alpha_max, eta, beta: FAB. The defaults are the original's (`DEFAULTS`).
    randomized: logits_fn is a randomised model `logits_fn(x, key)`; every call gets a fresh key, and the
      gradients of APGD average over eot_iter calls.
    devices: the devices to shard the points over (default: all local devices).
    point_index: (N,) the points' global indices, from which their random keys are drawn (default
      0..N-1); a process that attacks its share of a larger set passes its points' indices in the set, so
      the result does not depend on the process count.
    progress: tqdm bars per attack (points done, robust so far).
    sanity_checks: warn (`checks.AutoAttackWarning`) for randomised models, probability outputs, zero
      gradients, too few classes, and Square beating the gradient attacks.
    resume: a `CascadeState` that `on_progress` was given by an earlier call with the same inputs and
      settings: the run continues at its position (the pass's batch after the last one done) and returns
      what an uninterrupted run returns (x_adv, robust, fell_to, accuracy; seconds add up). Every point's
      randomness comes from its own key, a function of (seed, attack, pass, point_index), and a pass's
      batches are cut from its `todo` as at its start, so no draw depends on where the run stopped.
    on_progress: called with a `CascadeState` at the start of every pass (the clean pass, then each restart
      or target pass of each attack, also one left with no points) and after every batch of it; it may
      write the state out (for a resumable evaluation) and may raise to stop the run (the exception passes
      through `run`); a state it is given is a valid `resume` (copy it to keep it: `CascadeState`).
  Returns:
    An `AutoAttackResult`: x_adv, per-point `robust`, where each point fell, accuracy after each stage.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y).astype(np.int32)
  _check_inputs(x, y, eps, version, attacks, batch_size, norm)
  cascade = tuple(attacks) if attacks is not None else version_attacks(version, norm)
  base_version = 'standard' if attacks is not None else version
  version = 'custom' if attacks is not None else version
  if version == 'plus' and norm == 'L1' and sanity_checks:
    checks.warn_version_norm(version, norm)
  per_attack = version_settings(base_version, norm)
  for a, o in per_attack.items():
    for k, v in (('n_restarts', n_restarts), ('n_target_classes', n_target_classes),
                 ('n_queries', n_queries), ('eot_iter', eot_iter)):
      if v is not None and k in o:
        o[k] = int(v)
    if not randomized and 'eot_iter' in o:
      o['eot_iter'] = 1  # averaging a deterministic model's gradient changes nothing
  n_target_classes = max(per_attack['apgd-t']['n_target_classes'] if 'apgd-t' in cascade else 0,
                         per_attack['fab-t']['n_target_classes'] if 'fab-t' in cascade else 0)
  devices = list(jax.local_devices() if devices is None else devices)
  put_points, put_whole, n_dev = _placement(devices)
  copts = _compiler_options(devices)
  fn = put_whole(_as_partial(logits_fn))  # the weights go to the devices once per evaluation
  n = x.shape[0]
  gidx = np.arange(n, dtype=np.int32) if point_index is None else np.asarray(point_index, np.int32)
  if gidx.shape != (n,):
    raise AutoAttackInputError(f'point_index must hold one index per point, shape ({n},); got {gidx.shape}.')
  bs = int(min(batch_size, max(n, 1)))
  sizes = buckets(bs, n_dev)
  eps_arr = jnp.float32(eps)
  base_key = jax.random.PRNGKey(seed)
  model_base = jax.random.fold_in(base_key, 10_000) if randomized else None

  def model_key(stage: int, p: int, first: int):
    if model_base is None:
      return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(model_base, stage), p), first)

  def padded(idx):
    b = bucket_for(len(idx), sizes)
    pad = np.concatenate([idx, np.full(b - len(idx), idx[0])])
    return pad, np.arange(b) < len(idx)

  if resume is not None:
    _check_resume(resume, cascade, x)
  at = resume.stage if resume is not None else 0  # the stage to begin with

  def emit(stage, p, todo, next_start):
    if on_progress is not None:
      on_progress(CascadeState(cascade, stage, p, todo, int(min(next_start, len(todo))), bs, pred, zero_grad,
                               num_classes, robust, fell_to, x_adv, dict(attacked), dict(accuracy),
                               dict(seconds)))

  # Clean predictions, and the sanity checks (on the first batch; zero gradients on every point).
  start = time.time()
  if resume is None:
    pred, zero_grad, num_classes = np.zeros(n, np.int32), np.zeros(n, bool), 0
    seconds, accuracy, attacked = {}, {}, {}
  else:
    pred, zero_grad = np.array(resume.pred, np.int32), np.array(resume.zero_grad, bool)
    num_classes = int(resume.num_classes)
    seconds, accuracy = dict(resume.seconds), dict(resume.accuracy)
    attacked = {a: np.array(m, bool) for a, m in resume.attacked.items()}
  if at == 0:
    robust, fell_to, x_adv = np.zeros(n, bool), np.full(n, '', '<U8'), x  # filled after the clean pass
    every = np.arange(n, dtype=np.int64)
    first = resume.start if resume is not None else 0
    spent = seconds.get('clean', 0.0)
    emit(0, 0, every, first)
    for s in range(first, n, bs):
      idx = np.arange(s, min(s + bs, n))
      pad, _ = padded(idx)
      xb, yb = put_points(x[pad]), put_points(y[pad])
      logits, zero = _clean(fn, xb, yb, model_key(0, 0, s), copts)
      logits = np.asarray(logits)
      pred[idx] = np.argmax(logits, -1)[:len(idx)]
      zero_grad[idx] = np.asarray(zero)[:len(idx)]
      if s == 0:
        num_classes = logits.shape[-1]
        if sanity_checks:
          again = [np.asarray(_clean(fn, xb, yb, model_key(0, r, s), copts)[0]) for r in (1, 2)]
          if version != 'rand':  # the rand version is for randomised models (the original skips the check)
            checks.check_randomized([logits] + again, y[pad])
          checks.check_probabilities(logits)
          checks.check_num_classes(num_classes, cascade, n_target_classes)
      seconds['clean'] = spent + time.time() - start
      emit(0, 0, every, s + bs)
    if not n:  # no points (a process's share can be empty): the class count from the model's output shape
      z = jax.ShapeDtypeStruct((1,) + x.shape[1:], jnp.float32)
      num_classes = int(jax.eval_shape(lambda v: _call(fn, v, model_key(0, 0, 0)), z).shape[-1])
    if sanity_checks and n:
      checks.check_zero_gradients(zero_grad)
    clean = pred == y
    robust = clean.copy()
    fell_to = np.where(clean, '', 'clean').astype('<U8')
    x_adv = x.copy()
    accuracy['clean'] = float(np.mean(robust)) if n else float('nan')
    seconds['clean'] = spent + time.time() - start
  else:
    clean = pred == y
    robust, fell_to = np.array(resume.robust, bool), np.array(resume.fell_to, '<U8')
    x_adv = np.array(resume.x_adv, np.float32)
  options = {'apgd': (('n_iter', int(n_iter)), ('rho', float(rho))),
             'fab-t': (('alpha_max', float(alpha_max)), ('beta', float(beta)), ('eta', float(eta)),
                       ('n_iter', int(n_iter))),
             'square': (('p_init', float(p_init)),)}
  options['fab'] = options['fab-t']
  used = {}

  for number, attack in enumerate(cascade, start=1):
    o = per_attack[attack]
    kernel = _kernel(attack)
    opts = options[kernel]
    if kernel == 'apgd':
      opts = opts + (('eot_iter', int(o['eot_iter']) if 'eot_iter' in o else 1),
                     ('use_largereps', bool(o['use_largereps'])))
    if kernel == 'square':
      opts = opts + (('n_queries', int(o['n_queries'])),)
    used[attack] = dict(o, **dict(opts))
    if number < at:
      continue  # finished before the run was resumed
    resumed = resume is not None and number == at
    start = time.time()
    spent = seconds.get(attack, 0.0) if resumed else 0.0
    was_attacked = attacked[attack] if resumed and attack in attacked else np.zeros(n, bool)
    attacked[attack] = was_attacked
    if attack in TARGETED:
      n_passes = common.num_targets(o['n_target_classes'], num_classes)
      if attack == 'apgd-t' and num_classes < 4:
        n_passes = 0  # the targeted DLR loss needs 4 classes (check_num_classes warned)
    elif attack == 'apgd-dlr' and num_classes < 3:
      n_passes = 0
    else:
      n_passes = int(o.get('n_restarts', 1))  # a restart runs on the points left
    bar = tqdm.tqdm(total=0, desc=f'{desc} {attack}', unit='pt', dynamic_ncols=True, disable=not progress,
                    mininterval=0.5, leave=True)
    label = 'target' if attack in TARGETED else 'restart'
    try:
      for p in range(resume.pass_index if resumed else 0, n_passes):
        if resumed and p == resume.pass_index:
          todo, first = np.asarray(resume.todo, np.int64), int(resume.start)
        else:
          todo, first = np.flatnonzero(robust), 0
        # A pass with no points left still reports its start (the callbacks' sequence is the same on every
        # process of a multi-process evaluation, whatever its points).
        emit(number, p, todo, first)
        if first >= len(todo):
          continue
        bar.total += len(todo) - first
        if n_passes > 1:
          bar.set_postfix({'robust': f'{int(robust.sum())}/{n}', label: f'{p + 1}/{n_passes}'})
        bar.refresh()
        # Keyed by the attack's name, not its place: a stage draws the same in any cascade.
        stage = ATTACKS.index(attack) + 1
        pass_key = jax.random.fold_in(jax.random.fold_in(base_key, stage), p)
        for s in range(first, len(todo), bs):
          idx = todo[s:s + bs]
          m = len(idx)
          pad, active = padded(idx)
          adv_b, fooled_b = _attack_batch(
              fn, put_points(x[pad]), put_points(y[pad]), put_points(gidx[pad]),
              put_points(active), pass_key, jnp.int32(p), jnp.int32(LOSS_ID.get(attack, 0)), eps_arr,
              model_key(stage, p, int(gidx[idx[0]])), kernel=kernel, options=opts, norm=norm, compiler_options=copts)
          fooled_b = np.asarray(fooled_b)[:m]
          hit = idx[fooled_b]
          x_adv[hit] = np.asarray(adv_b)[:m][fooled_b]
          robust[hit] = False
          fell_to[hit] = attack
          was_attacked[idx] = True
          bar.update(m)
          postfix = {'robust': f'{int(robust.sum())}/{n}'}
          if n_passes > 1:
            postfix[label] = f'{p + 1}/{n_passes}'
          bar.set_postfix(postfix, refresh=False)
          seconds[attack] = spent + time.time() - start
          emit(number, p, todo, s + bs)
    finally:
      bar.close()
    accuracy[attack] = float(np.mean(robust)) if n else float('nan')
    seconds[attack] = spent + time.time() - start
    log.info('AutoAttack %s (%s): robust accuracy %.2f%% (%d/%d) after %.1f s', attack, norm,
             100 * accuracy[attack], int(robust.sum()), n, seconds[attack])
  if sanity_checks:
    checks.check_square(accuracy)
  return AutoAttackResult(x_adv=x_adv, robust=robust, clean=clean, fell_to=fell_to, accuracy=accuracy,
                          attacked=attacked, seconds=seconds, version=version, attacks=cascade,
                          eps=float(eps), seed=int(seed), norm=norm, settings=used)
