"""PGD: the budget, its effect on a trained model, jit parity and per-example random starts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autolora_jax import attacks
from autolora_jax.data import memory

EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(scope='module')
def trained_linear():
  """Softmax regression on 8x8 digits, trained here for a few hundred steps: a model worth attacking."""
  images, labels = memory.load_digits()
  x = jnp.asarray(images[:600])
  y = jnp.asarray(labels[:600])
  w = {'w': jnp.zeros((8 * 8 * 3, 10)), 'b': jnp.zeros(10)}

  def logits_fn(params, x):
    return x.reshape(x.shape[0], -1) @ params['w'] + params['b']

  tx = optax.adam(0.05)
  opt = tx.init(w)

  @jax.jit
  def step(w, opt):
    loss, g = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean())(w)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(w, updates), opt, loss

  for _ in range(300):
    w, opt, _ = step(w, opt)
  return functools.partial(logits_fn, w), x[:200], y[:200]


def _ce(logits, y):
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


def _acc(logits, y):
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


@pytest.mark.parametrize('key', [None, jax.random.PRNGKey(0)])
def test_pgd_stays_in_eps_ball_and_unit_box(trained_linear, key):
  logits_fn, x, y = trained_linear
  x = x.at[:5].set(0.0).at[5:10].set(1.0)  # points on the box's faces
  x_adv = attacks.pgd(logits_fn, x, y, eps=EPS, step_size=STEP, steps=10, key=key)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


def test_pgd_raises_loss_and_lowers_accuracy(trained_linear):
  logits_fn, x, y = trained_linear
  clean = logits_fn(x)
  assert _acc(clean, y) > 0.9
  x_adv = attacks.pgd(logits_fn, x, y, eps=0.1, step_size=0.025, steps=10)
  adv = logits_fn(x_adv)
  assert _ce(adv, y) > _ce(clean, y) + 0.5
  assert _acc(adv, y) < _acc(clean, y) - 0.2
  weaker = logits_fn(attacks.pgd(logits_fn, x, y, eps=0.1, step_size=0.025, steps=1))
  assert _ce(adv, y) >= _ce(weaker, y)  # more steps, no weaker attack


def test_pgd_jit_and_eager_agree(trained_linear):
  logits_fn, x, y = trained_linear
  kwargs = dict(eps=EPS, step_size=STEP, steps=5, key=jax.random.PRNGKey(4))
  eager = attacks.pgd(logits_fn, x, y, **kwargs)
  jitted = jax.jit(lambda x, y: attacks.pgd(logits_fn, x, y, **kwargs))(x, y)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-6)


def test_random_start_is_uniform_in_the_ball_and_per_example_keys_are_independent():
  x = jnp.full((64, 4, 4, 3), 0.5)
  start = attacks.random_start(jax.random.PRNGKey(0), x, EPS)
  delta = np.asarray(start - x)
  assert np.all(np.abs(delta) <= EPS + 1e-7) and abs(delta.mean()) < EPS / 10
  assert delta.std() == pytest.approx(EPS / np.sqrt(3), rel=0.05)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(jnp.arange(64))
  per_example = attacks.random_start(keys, x, EPS)
  halves = jnp.concatenate([attacks.random_start(keys[:32], x[:32], EPS),
                            attacks.random_start(keys[32:], x[32:], EPS)])
  np.testing.assert_array_equal(np.asarray(per_example), np.asarray(halves))  # split-independent


def _l2(d):
  return np.sqrt(np.sum(np.square(np.asarray(d)).reshape(d.shape[0], -1), axis=1))


@pytest.mark.parametrize('start', [False, True])
def test_l2_pgd_stays_in_the_l2_ball_and_box_and_raises_loss(trained_linear, start):
  fn, x, y = trained_linear
  eps = 0.5
  key = jax.random.split(jax.random.PRNGKey(0), x.shape[0]) if start else None
  x_adv = attacks.pgd(fn, x, y, eps=eps, step_size=eps / 4, steps=10, key=key, norm='l2')
  assert np.all(_l2(x_adv - x) <= eps + 1e-5)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  assert _ce(fn(x_adv), y) > _ce(fn(x), y) + 0.05
  assert _acc(fn(x_adv), y) < _acc(fn(x), y)
  # The L2 budget is not an L-infinity one: some pixel moves by more than eps / sqrt(d) * 4.
  assert float(jnp.max(jnp.abs(x_adv - x))) > 4 * eps / np.sqrt(x[0].size)
  start_point = attacks.random_start(jax.random.PRNGKey(1), x, eps, 'l2')
  assert np.all(_l2(start_point - x) <= eps + 1e-5)
  with pytest.raises(ValueError, match='norm'):
    attacks.pgd(fn, x, y, eps=eps, step_size=0.1, steps=1, norm='L2')
