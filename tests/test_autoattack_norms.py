"""AutoAttack under L2 and L1: the projections, each attack against a PGD of the same norm and budget, the
versions (plus, rand, custom), the bucket padding and the device count.

The model is a small MLP on scikit-learn's 8x8 digits (as in test_autoattack), attacked on few points with
few iterations; budgets where the model is robust on part of its points (L2 0.3, L1 1.5).
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import tiny_runs
from autolora_jax import attacks, autoattack
from autolora_jax.autoattack import cascade, common

EPS = {'L2': 0.3, 'L1': 1.5}
N_TRAIN_SKIP = 160
N_POINTS = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_mlp = helpers.digits_mlp


def _train(images, labels):
  return helpers.train_digits_mlp(images, labels, N_TRAIN_SKIP)


@pytest.fixture(scope='module')
def model():
  from sklearn.datasets import load_digits
  d = load_digits()
  images, labels = (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)
  params = _train(images, labels)
  return jax.tree_util.Partial(_mlp, params), images[:N_POINTS], labels[:N_POINTS]


def _correct(fn, x, y):
  return np.argmax(np.asarray(fn(jnp.asarray(x))), -1) == y


def _pgd(fn, x, y, eps, norm, steps=20):
  """A plain PGD of the norm: L2 from attacks.pgd; L1 normalised-gradient steps projected onto the L1
  ball and the box. Steps of eps / 4 (one step: eps)."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  step = eps if steps == 1 else eps / 4
  if norm == 'L2':
    return np.asarray(attacks.pgd(fn, x, y, eps=eps, step_size=step, steps=steps, norm='l2'))
  grad = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(fn(z), y).sum())
  z = x
  for _ in range(steps):
    z = common.project_l1(z + step * common.normalize(grad(z), 'L2'), x, eps)
  return np.asarray(z)


# ---------------------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm', ['Linf', 'L2', 'L1'])
def test_projection_keeps_every_point_in_the_ball_and_the_box(norm):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (64, 6, 6, 3)).astype(np.float32)
  x[:8] = np.round(x[:8])  # points on the box's corners
  for scale in (0.01, 0.3, 3.0):
    for eps in (0.05, 1.0, 5.0):
      z = x + scale * rng.normal(size=x.shape).astype(np.float32)
      p = np.asarray(common.project_ball(jnp.asarray(z), jnp.asarray(x), eps, norm))
      assert p.min() >= 0.0 and p.max() <= 1.0
      assert np.all(np.asarray(common.in_ball(jnp.asarray(p), jnp.asarray(x), eps, norm)))
      # A point already inside stays where it is.
      again = np.asarray(common.project_ball(jnp.asarray(p), jnp.asarray(x), eps, norm))
      np.testing.assert_allclose(again, p, atol=1e-5)


def test_l1_projection_is_the_closest_point_of_the_ball_and_the_box():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (16, 4, 4, 1)).astype(np.float32)
  z = x + rng.normal(size=x.shape).astype(np.float32)
  eps = 1.0
  p = np.asarray(common.project_l1(jnp.asarray(z), jnp.asarray(x), eps))
  assert np.allclose(np.abs(p - x).reshape(16, -1).sum(1), eps, atol=1e-4)  # z is far outside: on the sphere
  # Any other feasible point (random ones, and mixes with p) is at least as far from z.
  reps = 100
  xs = np.tile(x, (reps, 1, 1, 1))
  q = xs + rng.normal(size=xs.shape).astype(np.float32)
  q = np.asarray(common.project_l1(jnp.asarray(q), jnp.asarray(xs), eps))
  ps, zs = np.tile(p, (reps, 1, 1, 1)), np.tile(z, (reps, 1, 1, 1))
  for t in (1.0, 0.1):
    r = ps + t * (q - ps)  # feasible: the set is convex
    assert np.all(((r - zs) ** 2).reshape(len(r), -1).sum(1) >= ((ps - zs) ** 2).reshape(len(r), -1).sum(1) - 1e-5)


@pytest.mark.parametrize('name', ['L2', 'L1'])
def test_hyperplane_projection_reaches_the_plane_inside_the_box(name):
  rng = np.random.default_rng(2)
  project = {'L2': autoattack.project_to_hyperplane_l2, 'L1': autoattack.project_to_hyperplane_l1}[name]
  t = rng.uniform(0.2, 0.8, (32, 20)).astype(np.float32)
  w = rng.normal(size=(32, 20)).astype(np.float32)
  b = np.sum(w * t, 1) + rng.normal(scale=0.3, size=32).astype(np.float32)  # reachable inside the box
  d = np.asarray(project(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  np.testing.assert_allclose(np.sum(w * (t + d), 1), b, atol=1e-4)
  assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
  if name == 'L2':  # where the unconstrained minimiser stays in the box, it is the answer
    free = ((b - np.sum(w * t, 1)) / np.sum(w * w, 1))[:, None] * w
    inside = np.all((t + free >= 0) & (t + free <= 1), axis=1)
    assert inside.any()
    np.testing.assert_allclose(d[inside], free[inside], atol=1e-5)
  else:  # the L1 minimiser is no longer than moving the largest-|w| coordinate alone (where that fits)
    j = np.argmax(np.abs(w), 1)
    single = np.abs((b - np.sum(w * t, 1)) / w[np.arange(32), j])
    fits = np.where(np.sign((b - np.sum(w * t, 1)) * w[np.arange(32), j]) > 0, 1 - t[np.arange(32), j],
                    t[np.arange(32), j]) >= single
    assert fits.any()
    assert np.all(np.abs(d[fits]).sum(1) <= single[fits] + 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Each attack against a PGD of the same norm and budget
# ---------------------------------------------------------------------------------------------------------

ATTACKS = {
    'apgd-l2': ('L2', lambda f, x, y, eps: autoattack.apgd_ce(f, x, y, jax.random.PRNGKey(1), eps=eps, norm='L2',
                                                             n_restarts=2)),
    'apgd-l1': ('L1', lambda f, x, y, eps: autoattack.apgd_ce(f, x, y, jax.random.PRNGKey(1), eps=eps, norm='L1',
                                                             use_largereps=True, n_restarts=3)),
    'apgd-t-l1': ('L1', lambda f, x, y, eps: autoattack.apgd_t(f, x, y, jax.random.PRNGKey(1), eps=eps,
                                                              norm='L1', n_target_classes=3)),
    'fab-l2': ('L2', lambda f, x, y, eps: autoattack.fab_t(f, x, y, eps=eps, norm='L2', n_target_classes=3)),
    'fab-l1': ('L1', lambda f, x, y, eps: autoattack.fab_t(f, x, y, eps=eps, norm='L1', n_target_classes=3)),
    'square-l2': ('L2', lambda f, x, y, eps: autoattack.square(f, x, y, jax.random.PRNGKey(1), eps=eps,
                                                              norm='L2', n_queries=1000)),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(ATTACKS))
def test_attack_breaks_at_least_as_often_as_pgd(model, name):
  fn, x, y = model
  norm, attack = ATTACKS[name]
  eps = EPS[norm]
  x_adv, fooled = jax.jit(lambda x, y: attack(fn, x, y, eps))(x, y)
  x_adv, fooled = np.asarray(x_adv), np.asarray(fooled)
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  assert np.all(np.asarray(common.in_ball(jnp.asarray(x_adv), jnp.asarray(x), eps, norm)))
  after = _correct(fn, x_adv, y)
  assert np.all(~after[fooled]) and not np.any(after & ~_correct(fn, x, y))
  pgd_after = _correct(fn, _pgd(fn, x, y, eps, norm), y)
  if not name.startswith('square'):
    assert after.sum() <= pgd_after.sum(), f'{name}: {after.sum()} robust, PGD-{norm}: {pgd_after.sum()}'
  assert after.sum() < _correct(fn, x, y).sum()


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['L2', 'L1'])
def test_square_breaks_a_quantised_model_at_least_as_often_as_pgd(model, norm):
  # Square sees no gradient: on this smooth MLP it is weaker than PGD-20 (the original's Square L2 too: 76%
  # robust at 5,000 queries on 160 of these points, PGD-20 64%). Where the gradient is masked (the input
  # rounded to the digits' 1/16 grid: zero gradient everywhere), PGD breaks nothing and Square still does.
  fn, x, y = model
  quantised = jax.tree_util.Partial(lambda p, z: _mlp(p, jnp.round(z * 16) / 16), fn.args[0])
  eps = EPS[norm]
  pgd_after = _correct(quantised, _pgd(quantised, x, y, eps, norm), y)
  x_adv, fooled = jax.jit(lambda x, y: autoattack.square(quantised, x, y, jax.random.PRNGKey(1), eps=eps,
                                                         norm=norm, n_queries=1000))(x, y)
  after = _correct(quantised, np.asarray(x_adv), y)
  assert np.all(np.asarray(common.in_ball(x_adv, jnp.asarray(x), eps, norm)))
  assert np.asarray(x_adv).min() >= 0 and np.asarray(x_adv).max() <= 1
  assert after.sum() <= pgd_after.sum() and after.sum() < _correct(quantised, x, y).sum()


def test_each_attack_refuses_a_norm_the_original_does_not_run_it_with(model):
  fn, x, y = model
  for call in (lambda: autoattack.apgd(fn, x, y, jax.random.PRNGKey(0), eps=1.0, norm='L0'),
               lambda: autoattack.fab_t(fn, x, y, eps=1.0, norm='l2'),
               lambda: autoattack.square(fn, x, y, jax.random.PRNGKey(0), eps=1.0, norm='Lp')):
    with pytest.raises(ValueError, match='norm must be one of'):
      call()
  with pytest.raises(ValueError, match='use_largereps'):
    autoattack.apgd(fn, x, y, jax.random.PRNGKey(0), eps=1.0, norm='L2', use_largereps=True)
  for norm in ('Linf', 'L2', 'L1'):  # the original runs every attack under every norm
    assert autoattack.version_attacks('standard', norm) == ('apgd-ce', 'apgd-t', 'fab-t', 'square')


# ---------------------------------------------------------------------------------------------------------
# The cascade: norms, versions, buckets
# ---------------------------------------------------------------------------------------------------------

def test_versions_are_the_originals():
  assert autoattack.VERSIONS['plus'] == ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
  assert autoattack.VERSIONS['rand'] == ('apgd-ce', 'apgd-dlr')
  l1 = autoattack.version_settings('standard', 'L1')
  assert (l1['apgd-ce']['n_restarts'], l1['apgd-ce']['use_largereps'], l1['apgd-t']['n_target_classes']) == (
      5, True, 5)
  plus = autoattack.version_settings('plus', 'Linf')
  assert (plus['apgd-ce']['n_restarts'], plus['apgd-dlr']['n_restarts'], plus['fab']['n_restarts'],
          plus['apgd-t']['n_target_classes'], plus['fab-t']['n_target_classes']) == (5, 5, 5, 9, 9)
  rand = autoattack.version_settings('rand', 'Linf')
  assert rand['apgd-ce']['eot_iter'] == rand['apgd-dlr']['eot_iter'] == 20
  assert autoattack.buckets(64) == (8, 16, 32, 64)
  assert autoattack.buckets(250, 4) == (8, 16, 32, 64, 128, 252)
  assert autoattack.buckets(6) == (6,)


@pytest.mark.slow
def test_cascade_pads_to_buckets_and_records_the_norm(model, monkeypatch):
  fn, x, y = model
  shapes = []
  inner = cascade._attack_batch

  def recording(f, xb, *args, **kw):
    shapes.append((kw['kernel'], kw['norm'], xb.shape[0], int(np.sum(np.asarray(args[2])))))
    return inner(f, xb, *args, **kw)

  monkeypatch.setattr(cascade, '_attack_batch', recording)
  res = autoattack.run(fn, x, y, eps=EPS['L2'], norm='L2', attacks=['apgd-ce', 'fab-t'], n_iter=10,
                       n_target_classes=2, batch_size=32, progress=False, sanity_checks=False)
  assert res.norm == 'L2' and res.version == 'custom'
  summary = json.loads(json.dumps(res.summary()))
  assert summary['norm'] == 'L2' and summary['version'] == 'custom'
  assert summary['settings']['fab-t']['n_target_classes'] == 2
  for kernel, norm, size, active in shapes:
    assert norm == 'L2' and size in (8, 16, 32)
    assert size == min(b for b in (8, 16, 32) if b >= active), (size, active)
  assert any(size < 32 for _, _, size, _ in shapes)  # the points left after APGD-CE run in a smaller bucket
  assert res.robust_accuracy < res.clean_accuracy
  assert np.all(np.asarray(common.in_ball(jnp.asarray(res.x_adv), jnp.asarray(x), EPS['L2'], 'L2')))


@pytest.mark.slow
def test_rand_version_on_a_noisy_model_averages_gradients(model):
  fn, x, y = model

  def noisy(z, key):
    return fn(jnp.clip(z + 0.05 * jax.random.normal(key, z.shape), 0, 1))

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', autoattack.AutoAttackWarning)
    # A non-rand version warns that the model is randomised, and still runs.
    fast = autoattack.run(noisy, x[:16], y[:16], eps=EPS['L2'], norm='L2', attacks=['apgd-ce'],
                          randomized=True, n_iter=3, progress=False)
  assert any('randomised' in str(w.message) for w in caught)
  assert fast.settings['apgd-ce']['eot_iter'] == 1
  res = autoattack.run(noisy, x[:16], y[:16], eps=EPS['L2'], norm='L2', version='rand', randomized=True,
                       n_iter=5, progress=False)
  assert res.attacks == ('apgd-ce', 'apgd-dlr')
  assert res.settings['apgd-ce']['eot_iter'] == res.settings['apgd-dlr']['eot_iter'] == 20
  assert res.summary()['settings']['apgd-ce']['eot_iter'] == 20
  assert res.robust_accuracy < res.clean_accuracy
  same = autoattack.run(noisy, x[:16], y[:16], eps=EPS['L2'], norm='L2', version='rand', randomized=True,
                        n_iter=5, progress=False)
  np.testing.assert_array_equal(res.robust, same.robust)  # the model's keys come from the seed


# ---------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------

DEVICE_SCRIPT = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
import test_autoattack_norms as t
from sklearn.datasets import load_digits
from autolora_jax import autoattack
assert jax.local_device_count() == 4
d = load_digits()
images, labels = (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)
fn = jax.tree_util.Partial(t._mlp, t._train(images, labels))
x, y = images[:20], labels[:20]
out = {}
cascades = {'Linf': ['apgd-ce', 'square'], 'L2': ['fab-t', 'square'], 'L1': ['apgd-ce', 'square']}
for norm, eps in (('Linf', 16 / 255), ('L2', 0.3), ('L1', 1.5)):
  kw = dict(eps=eps, norm=norm, attacks=cascades[norm], n_iter=10, n_target_classes=2, n_queries=50,
            batch_size=8, progress=False, sanity_checks=False)
  four = autoattack.run(fn, x, y, **kw)
  one = autoattack.run(fn, x, y, devices=jax.local_devices()[:1], **kw)
  out[norm] = dict(same_fell=bool(np.array_equal(four.fell_to, one.fell_to)),
                   max_diff=float(np.max(np.abs(four.x_adv - one.x_adv))),
                   broken=int(np.sum(~four.robust & four.clean)))
print('RESULT ' + json.dumps(out))
'''


@pytest.mark.slow
def test_four_devices_give_the_per_point_result_of_one():
  env = tiny_runs.env_for(4)
  proc = subprocess.run([sys.executable, '-c', DEVICE_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split('RESULT ')[-1])
  for norm, r in out.items():
    assert r['same_fell'], (norm, r)
    assert r['max_diff'] < 1e-4, (norm, r)
    assert r['broken'] > 0, (norm, r)


@pytest.mark.slow
def test_a_share_of_the_points_draws_as_in_the_whole_set(model):
  # A process attacking its share passes the points' global indices: each point's result is the same as
  # in a run on all points (the keys come from the index, not the position in the call).
  fn, x, y = model
  kw = dict(eps=EPS['L2'], norm='L2', attacks=['apgd-ce'], n_iter=10, batch_size=64, progress=False,
            sanity_checks=False)
  whole = autoattack.run(fn, x, y, **kw)
  share = autoattack.run(fn, x[40:], y[40:], point_index=np.arange(40, len(x)), **kw)
  np.testing.assert_array_equal(share.fell_to, whole.fell_to[40:])
  np.testing.assert_allclose(share.x_adv, whole.x_adv[40:], atol=1e-6)
  shifted = autoattack.run(fn, x[40:], y[40:], **kw)  # indices 0..: other random starts, other examples
  both = (shifted.fell_to == 'apgd-ce') & (share.fell_to == 'apgd-ce')
  assert both.any() and not np.allclose(shifted.x_adv[both], share.x_adv[both])
