"""A small trained model for AutoAttack benchmarks and tests: an MLP 64-64-10 on scikit-learn's 8x8 digits.

`train(images, labels, skip)` trains it (Adam 1e-2, 300 full-batch steps) on all digits but the first
`skip`, which are left for attacking; at L-infinity 16/255, L2 0.3 and L1 1.5 it is robust on part of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def logits(params, x):
  """Logits (N, 10) of images (N, 8, 8, 1) in [0, 1]."""
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


def digits():
  """(images (1797, 8, 8, 1) float32 in [0, 1], labels (1797,) int32)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


def train(images, labels, skip: int, steps: int = 300):
  """The MLP's parameters trained on all digits but the first `skip`."""
  x_train, y_train = jnp.asarray(images[skip:]), jnp.asarray(labels[skip:])
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {'w1': jax.random.normal(k1, (64, 64)) / 8, 'b1': jnp.zeros(64),
            'w2': jax.random.normal(k2, (64, 10)) / 8, 'b2': jnp.zeros(10)}
  return _fit(logits, params, x_train, y_train, 1e-2, steps)


def cnn_logits(params, x):
  """A small CNN on the digits: conv 3x3 (16) - conv 3x3 stride 2 (32) - dense 10."""
  dn = ('NHWC', 'HWIO', 'NHWC')
  h = jax.nn.relu(jax.lax.conv_general_dilated(x, params['c1'], (1, 1), 'SAME', dimension_numbers=dn))
  h = jax.nn.relu(jax.lax.conv_general_dilated(h, params['c2'], (2, 2), 'SAME', dimension_numbers=dn))
  return h.reshape(h.shape[0], -1) @ params['w'] + params['b']


def train_cnn(images, labels, skip: int, steps: int = 200):
  """`cnn_logits`'s parameters trained like `train`'s MLP."""
  x_train, y_train = jnp.asarray(images[skip:]), jnp.asarray(labels[skip:])
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {'c1': jax.random.normal(k1, (3, 3, 1, 16)) / 3, 'c2': jax.random.normal(k2, (3, 3, 16, 32)) / 12,
            'w': jax.random.normal(k3, (4 * 4 * 32, 10)) / 23, 'b': jnp.zeros(10)}
  return _fit(cnn_logits, params, x_train, y_train, 3e-3, steps)


def _fit(model, params, x_train, y_train, lr: float, steps: int):
  """Adam on the full-batch cross-entropy of model(params, x)."""
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model(p, x_train), y_train).mean())(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params
