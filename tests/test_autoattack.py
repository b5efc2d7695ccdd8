"""AutoAttack: the original's settings, the attacks' guarantees, the cascade's rules, the sanity checks.

The model is a small MLP trained here in a few seconds on scikit-learn's 8x8 digits (10 classes, so the
targeted attacks get all nine targets); the attacks run with the original's defaults (cheap on this model).
"""

import ast
import inspect
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from autolora_jax import attacks, autoattack, errors
from autolora_jax.autoattack import cascade, checks, common
from autolora_jax.autoattack.errors import AutoAttackInputError

EPS = 16 / 255  # digits are nearly robust at 8/255 for this model: a larger budget separates the attacks
TOL = common.BALL_TOL
N_POINTS = 160


_mlp = helpers.digits_mlp


@pytest.fixture(scope='module')
def digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


@pytest.fixture(scope='module')
def model(digits):
  """(logits_fn, params, x_test, y_test): an MLP 64-64-10 trained on all but the first N_POINTS digits."""
  images, labels = digits
  params = helpers.train_digits_mlp(images, labels, N_POINTS)
  return jax.tree_util.Partial(_mlp, params), params, images[:N_POINTS], labels[:N_POINTS]


def accuracy(logits_fn, x, y):
  return float(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == y))


def correct(logits_fn, x, y):
  return np.argmax(np.asarray(logits_fn(x)), -1) == y


@pytest.fixture(scope='module')
def standard(model):
  logits_fn, _, x, y = model
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', autoattack.AutoAttackWarning)
    return autoattack.run(logits_fn, x, y, eps=EPS, version='standard', seed=0, batch_size=64,
                          progress=False)


# ---------------------------------------------------------------------------------------------------------
# The original's settings
# ---------------------------------------------------------------------------------------------------------

def _defaults(fn):
  return {k: v.default for k, v in inspect.signature(fn).parameters.items()
          if v.default is not inspect.Parameter.empty}


def test_defaults_are_the_originals():
  assert autoattack.VERSIONS['standard'] == ('apgd-ce', 'apgd-t', 'fab-t', 'square')
  assert autoattack.VERSIONS['fast'] == ('apgd-ce', 'apgd-t')
  original = dict(n_iter=100, n_restarts=1, rho=0.75, n_target_classes=9, n_queries=5000, p_init=0.8,
                  alpha_max=0.1, eta=1.05, beta=0.9)
  assert autoattack.DEFAULTS == original
  run = _defaults(autoattack.run)
  assert run['eps'] == 8 / 255 and run['version'] == 'standard' and run['seed'] == 0 and run['norm'] == 'Linf'
  fixed = ('n_iter', 'rho', 'p_init', 'alpha_max', 'eta', 'beta')
  assert {k: run[k] for k in fixed} == {k: original[k] for k in fixed}
  # The per-version numbers (the original's set_version); None in run() means "the version's".
  assert all(run[k] is None for k in ('n_restarts', 'n_target_classes', 'n_queries', 'eot_iter'))
  std = autoattack.version_settings('standard', 'Linf')
  assert (std['apgd-ce']['n_restarts'], std['apgd-t']['n_target_classes'], std['fab-t']['n_target_classes'],
          std['square']['n_queries']) == (1, 9, 9, 5000)
  assert {k: _defaults(autoattack.apgd_ce)[k] for k in ('n_iter', 'n_restarts', 'rho')} == dict(
      n_iter=100, n_restarts=1, rho=0.75)
  assert {k: _defaults(autoattack.apgd_t)[k] for k in ('n_iter', 'n_target_classes', 'first_target')} == dict(
      n_iter=100, n_target_classes=9, first_target=2)
  assert {k: _defaults(autoattack.fab_t)[k] for k in ('n_iter', 'n_target_classes', 'alpha_max', 'eta',
                                                      'beta')} == dict(n_iter=100, n_target_classes=9,
                                                                       alpha_max=0.1, eta=1.05, beta=0.9)
  assert {k: _defaults(autoattack.square)[k] for k in ('n_queries', 'p_init')} == dict(n_queries=5000,
                                                                                       p_init=0.8)


def test_apgd_step_size_checks_are_the_originals():
  # Checks after 22, 41, 57, 70, 80, 87, 93 and 99 of 100 steps (APGD paper: p_j = 0, 0.22, 0.41, ...).
  assert [i + 1 for i, _ in autoattack.apgd_step_size_checks(100)] == [22, 41, 57, 70, 80, 87, 93, 99]
  assert [k for _, k in autoattack.apgd_step_size_checks(100)] == [22, 19, 16, 13, 10, 7, 6, 6]
  assert [i + 1 for i, _ in autoattack.apgd_step_size_checks(10)] == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_square_schedule_is_the_originals():
  sides = autoattack.side_schedule(8002, 32, 32)
  # sqrt(p * 1024) for p = 0.8 / 2^k, halving after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 queries.
  at = [0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2000, 2001, 4000, 4001, 6000, 6001, 8000, 8001]
  assert [int(sides[i]) for i in at] == [29, 29, 20, 20, 14, 14, 10, 10, 7, 7, 5, 5, 4, 4, 3, 3, 2, 2, 1]
  assert int(autoattack.side_schedule(1, 8, 8)[0]) == 7  # round(sqrt(0.8 * 64)) = 7 <= 8


# ---------------------------------------------------------------------------------------------------------
# Each attack on its own
# ---------------------------------------------------------------------------------------------------------

ATTACK_FNS = {
    'apgd_ce': lambda f, x, y, key, active=None: autoattack.apgd_ce(f, x, y, key, eps=EPS, active=active),
    'apgd_t': lambda f, x, y, key, active=None: autoattack.apgd_t(f, x, y, key, eps=EPS, active=active),
    'fab_t': lambda f, x, y, key, active=None: autoattack.fab_t(f, x, y, key, eps=EPS, active=active),
    'square': lambda f, x, y, key, active=None: autoattack.square(f, x, y, key, eps=EPS, active=active),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(ATTACK_FNS))
def test_attack_stays_in_the_ball_and_never_raises_accuracy(model, name):
  logits_fn, _, x, y = model
  attack = jax.jit(ATTACK_FNS[name])
  x_adv, fooled = attack(logits_fn, x, y, jax.random.PRNGKey(1))
  x_adv, fooled = np.asarray(x_adv), np.asarray(fooled)
  assert np.max(np.abs(x_adv - x)) <= EPS + TOL
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  before, after = correct(logits_fn, x, y), correct(logits_fn, x_adv, y)
  assert not np.any(after & ~before), 'a point misclassified before the attack is classified correctly after'
  assert np.all(~after[fooled]), 'a point reported fooled is classified correctly'
  assert after.sum() < before.sum(), f'{name} broke no point at eps {EPS:.3f}'
  np.testing.assert_array_equal(x_adv[~fooled], x[~fooled])


@pytest.mark.parametrize('name', sorted(ATTACK_FNS))
def test_attack_leaves_inactive_points_alone(model, name):
  logits_fn, _, x, y = model
  active = np.arange(len(y)) % 2 == 0
  x_adv, fooled = jax.jit(ATTACK_FNS[name])(logits_fn, x, y, jax.random.PRNGKey(1), active)
  x_adv, fooled = np.asarray(x_adv), np.asarray(fooled)
  np.testing.assert_array_equal(x_adv[~active], x[~active])
  assert not fooled[~active].any() and fooled[active].any()


def test_project_to_hyperplane_is_the_smallest_linf_step():
  rng = np.random.default_rng(0)
  m, d = 64, 30
  t = rng.random((m, d)).astype(np.float32)
  w = rng.normal(size=(m, d)).astype(np.float32)
  w[:, :3] = 0.0  # coordinates that cannot help must not move
  target = (rng.normal(size=m) * np.where(np.arange(m) % 4 == 0, 20.0, 2.0)).astype(np.float32)
  b = (w * t).sum(1) + target
  step = np.asarray(autoattack.project_to_hyperplane(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  z = t + step
  assert np.all(step[:, :3] == 0)
  assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
  # Reachable inside the box? The most w.z can change towards b is with every coordinate moved fully.
  sign = np.sign(target)[:, None]
  room = np.where(sign * w > 0, 1 - t, t)
  reach = (np.abs(w) * room).sum(1)
  feasible = reach >= np.abs(target)
  assert feasible.sum() > 10 and (~feasible).sum() > 0
  np.testing.assert_allclose((w * z).sum(1)[feasible], b[feasible], atol=1e-4)
  # Minimal: by bisection on the L-inf radius, the smallest lambda with sum |w_i| min(lambda, room_i) >= |c|.
  for i in np.flatnonzero(feasible):
    lo, hi = 0.0, 1.0
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (lo, mid) if np.sum(np.abs(w[i]) * np.minimum(mid, room[i])) >= abs(target[i]) else (mid, hi)
    assert np.max(np.abs(step[i])) == pytest.approx(hi, abs=1e-4)
  # Unreachable: every coordinate goes as far as the box allows.
  np.testing.assert_allclose(np.abs(step[~feasible]), (room * (w != 0))[~feasible], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The cascade
# ---------------------------------------------------------------------------------------------------------

def test_cascade_accuracy_ordering(model, standard):
  logits_fn, _, x, y = model
  clean = accuracy(logits_fn, x, y)
  x_pgd = attacks.pgd(logits_fn, x, y, eps=EPS, step_size=EPS / 4, steps=10)
  pgd10 = accuracy(logits_fn, x_pgd, y)
  apgd_ce = autoattack.run(logits_fn, x, y, eps=EPS, attacks=['apgd-ce'], batch_size=64, progress=False,
                           sanity_checks=False)
  aa = standard.robust_accuracy
  assert standard.accuracy['clean'] == pytest.approx(clean)
  assert aa <= apgd_ce.robust_accuracy <= pgd10 <= clean
  assert aa < clean
  # The cascade's first stage is APGD-CE itself (same seed, same keys).
  assert standard.accuracy['apgd-ce'] == pytest.approx(apgd_ce.robust_accuracy)
  assert list(standard.accuracy) == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  assert all(a >= b for a, b in zip(list(standard.accuracy.values()), list(standard.accuracy.values())[1:]))
  # The result is consistent: x_adv reproduces the robust flags, stays in the ball, robust is what is left.
  np.testing.assert_array_equal(correct(logits_fn, standard.x_adv, y), standard.robust)
  assert np.max(np.abs(standard.x_adv - x)) <= EPS + TOL
  assert 0 <= standard.x_adv.min() <= standard.x_adv.max() <= 1
  np.testing.assert_array_equal(standard.robust, standard.fell_to == '')
  assert aa == pytest.approx(np.mean(standard.robust))


def test_apgd_t_finds_points_apgd_ce_misses_or_equals_it(model):
  logits_fn, _, x, y = model
  kw = dict(eps=EPS, batch_size=64, progress=False, sanity_checks=False)
  ce = autoattack.run(logits_fn, x, y, attacks=['apgd-ce'], **kw).robust
  t = autoattack.run(logits_fn, x, y, attacks=['apgd-t'], **kw).robust
  assert (ce & ~t).any() or np.array_equal(ce, t)


def test_cascade_never_attacks_a_broken_point(model, standard, monkeypatch):
  logits_fn, _, x, y = model
  calls = []
  inner = cascade._attack_batch

  def recording(fn, xb, yb, index, active, pass_key, pass_index, loss_id, eps, model_key, **static):
    names = {v: k for k, v in cascade.LOSS_ID.items()}
    attack = names[int(loss_id)] if static['kernel'] == 'apgd' else static['kernel']
    calls.append((attack, np.asarray(index)[np.asarray(active)]))
    return inner(fn, xb, yb, index, active, pass_key, pass_index, loss_id, eps, model_key, **static)

  monkeypatch.setattr(cascade, '_attack_batch', recording)
  result = autoattack.run(logits_fn, x, y, eps=EPS, version='standard', seed=0, batch_size=64,
                          progress=False, sanity_checks=False)
  np.testing.assert_array_equal(result.fell_to, standard.fell_to)
  order = ['clean'] + list(result.attacks)
  stage = {a: i for i, a in enumerate(order)}
  fell_stage = np.array([stage.get(f, len(order)) for f in result.fell_to])
  for attack, idx in calls:
    # Every point an attack sees was still robust when that attack started (it fell to it or later).
    assert np.all(fell_stage[idx] >= stage[attack]), f'{attack} attacked a point broken before it'
  for attack in result.attacks:
    seen = np.unique(np.concatenate([idx for a, idx in calls if a == attack] or [np.zeros(0, int)]))
    np.testing.assert_array_equal(seen, np.flatnonzero(result.attacked[attack]))
    # ... and every point still robust at its start was attacked.
    np.testing.assert_array_equal(result.attacked[attack], fell_stage >= stage[attack])
  # Points broken early keep their adversarial example: later attacks do not overwrite it.
  only_ce = autoattack.run(logits_fn, x, y, eps=EPS, attacks=['apgd-ce'], seed=0, batch_size=64,
                           progress=False, sanity_checks=False)
  by_ce = result.fell_to == 'apgd-ce'
  assert by_ce.any()
  np.testing.assert_array_equal(result.x_adv[by_ce], only_ce.x_adv[by_ce])
  np.testing.assert_array_equal(result.x_adv[result.fell_to == 'clean'], x[result.fell_to == 'clean'])


def test_same_seed_same_result(model, standard):
  logits_fn, _, x, y = model
  again = autoattack.run(logits_fn, x, y, eps=EPS, version='standard', seed=0, batch_size=64, progress=False,
                         sanity_checks=False)
  np.testing.assert_array_equal(again.x_adv, standard.x_adv)
  np.testing.assert_array_equal(again.fell_to, standard.fell_to)
  other = autoattack.run(logits_fn, x, y, eps=EPS, attacks=['apgd-ce'], seed=1, batch_size=64, progress=False,
                         sanity_checks=False)
  same = standard.fell_to == 'apgd-ce'
  assert not np.array_equal(other.x_adv[same], standard.x_adv[same]), 'the seed changes nothing'


def test_fast_version_and_batch_size_independence(model, standard):
  logits_fn, _, x, y = model
  fast = autoattack.run(logits_fn, x, y, eps=EPS, version='fast', batch_size=64, progress=False,
                        sanity_checks=False)
  assert fast.attacks == ('apgd-ce', 'apgd-t') and fast.version == 'fast'
  assert fast.accuracy == {k: standard.accuracy[k] for k in ('clean', 'apgd-ce', 'apgd-t')}
  # Each point draws from its own key: another batch size (another compilation) breaks the same points.
  other = autoattack.run(logits_fn, x, y, eps=EPS, version='fast', batch_size=48, progress=False,
                         sanity_checks=False)
  np.testing.assert_array_equal(other.robust, fast.robust)


def test_summary_is_json_serialisable(standard):
  import json
  summary = json.loads(json.dumps(standard.summary()))
  assert summary['num_points'] == N_POINTS and summary['version'] == 'standard'
  assert sum(summary['broken_by'].values()) == int(np.sum(standard.fell_to != '')) - int(
      np.sum(standard.fell_to == 'clean'))


# ---------------------------------------------------------------------------------------------------------
# Gradient masking and the sanity checks
# ---------------------------------------------------------------------------------------------------------

def test_square_breaks_a_quantised_model_where_pgd_fails(model):
  _, params, x, y = model

  # Digits are multiples of 1/16; the input step rounds to that grid. Its gradient is zero everywhere, but a
  # move of 8/255 > 1/32 changes the rounded pixel, so a search that uses no gradient still gets through.
  def quantised(p, z):
    return _mlp(p, jnp.round(z * 16) / 16)

  logits_fn = jax.tree_util.Partial(quantised, params)
  eps = 8 / 255
  clean = accuracy(logits_fn, x, y)
  pgd10 = accuracy(logits_fn, attacks.pgd(logits_fn, x, y, eps=eps, step_size=2 / 255, steps=10), y)
  with pytest.warns(autoattack.AutoAttackWarning, match='zero input gradient'):
    result = autoattack.run(logits_fn, x, y, eps=eps, attacks=['square'], batch_size=64, progress=False)
  assert pgd10 == clean
  assert result.robust_accuracy < clean - 0.05


def test_warns_for_probabilities(model):
  _, params, x, y = model
  probs = jax.tree_util.Partial(lambda p, z: jax.nn.softmax(_mlp(p, z)), params)
  with pytest.warns(autoattack.AutoAttackWarning, match='probabilities'):
    autoattack.run(probs, x[:16], y[:16], attacks=['apgd-ce'], n_iter=2, progress=False)


def test_no_warning_for_a_plain_model(model):
  logits_fn, _, x, y = model
  with warnings.catch_warnings():
    warnings.simplefilter('error', autoattack.AutoAttackWarning)
    autoattack.run(logits_fn, x[:16], y[:16], attacks=['apgd-ce'], n_iter=2, progress=False)


def test_warns_for_a_randomised_model(model):
  logits_fn, _, x, y = model
  rng = np.random.default_rng(0)
  outputs = [np.asarray(logits_fn(x)) + rng.normal(scale=0.5, size=(len(y), 10)) for _ in range(3)]
  with pytest.warns(autoattack.AutoAttackWarning, match='randomised'):
    assert checks.check_randomized(outputs, y)
  with warnings.catch_warnings():
    warnings.simplefilter('error', autoattack.AutoAttackWarning)
    assert not checks.check_randomized([np.asarray(logits_fn(x))] * 3, y)


def test_warns_for_too_few_classes_and_square_success():
  with pytest.warns(autoattack.AutoAttackWarning, match='only 5 classes'):
    assert checks.check_num_classes(5, autoattack.VERSIONS['standard'], 9)
  with pytest.warns(autoattack.AutoAttackWarning, match='Square'):
    assert checks.check_square({'clean': 0.9, 'apgd-ce': 0.5, 'apgd-t': 0.5, 'fab-t': 0.5, 'square': 0.4})
  with warnings.catch_warnings():
    warnings.simplefilter('error', autoattack.AutoAttackWarning)
    assert not checks.check_square({'clean': 0.9, 'apgd-ce': 0.5, 'apgd-t': 0.5, 'fab-t': 0.5, 'square': 0.5})


def test_bad_input_is_an_input_error(model):
  logits_fn, _, x, y = model
  # autoattack/ has its own error type; the entry points treat it as bad input (exit 2, one paragraph).
  assert AutoAttackInputError in errors.input_errors() and issubclass(AutoAttackInputError, ValueError)
  with pytest.raises(AutoAttackInputError, match='version'):
    autoattack.run(logits_fn, x, y, version='ultra')
  with pytest.raises(AutoAttackInputError, match='norm'):
    autoattack.run(logits_fn, x, y, norm='Linfinity')
  with pytest.raises(AutoAttackInputError, match='eps'):
    autoattack.run(logits_fn, x, y, norm='L2', eps=100.0)  # > sqrt(64): no image pair is that far apart
  with pytest.raises(AutoAttackInputError, match=r'\[0, 1\]'):
    autoattack.run(logits_fn, x * 255, y)
  with pytest.raises(AutoAttackInputError, match='attacks'):
    autoattack.run(logits_fn, x, y, attacks=['pgd'])
  with pytest.raises(AutoAttackInputError, match='shape'):
    autoattack.run(logits_fn, x[:, :, :, 0], y)


def test_the_package_is_self_contained():
  # autoattack/ imports nothing of autolora_jax outside itself (the dependency points package -> autoattack).
  folder = os.path.dirname(autoattack.__file__)
  for name in sorted(os.listdir(folder)):
    if name.endswith('.py'):
      with open(os.path.join(folder, name)) as f:
        tree = ast.parse(f.read())
      imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
      imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
      inside = [m for m in imported if m.split('.')[0] == 'autolora_jax']
      assert all(m.startswith('autolora_jax.autoattack') for m in inside), (name, inside)
