"""models.attention: jax.nn.dot_product_attention ('xla', or JAX's choice) computes what the written-out
einsums compute, alone and inside a ViT and a Swin (its shifted windows' mask included), and
config.model.attention_impl picks the implementation per backend.

Tolerance: float32 outputs and gradients within 1e-5 of each tensor's largest entry (the two differ in where
the 1/sqrt(head_dim) scale is applied and in the order of the bias additions: round-off only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import models
from autolora_jax.configs import default
from tests import helpers


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(float(np.max(np.abs(y))), 1e-30))


def test_attention_for_picks_the_einsums_on_cpus_and_jax_elsewhere():
  assert models.attention_for('auto', 'cpu') == 'einsum'
  assert models.attention_for('auto', 'gpu') == models.attention_for('auto', 'tpu') == 'dot_product'
  for impl in ('einsum', 'xla', 'cudnn'):
    assert models.attention_for(impl, 'cpu') == models.attention_for(impl, 'gpu') == impl
  with pytest.raises(ValueError, match='flash'):
    models.attention_for('flash', 'cpu')
  config = default.get_config()
  config.model.arch = 'vit_s16'
  assert models.spec('vit_s16').attributes(config.model)['attention'] == 'einsum'  # the CPU's
  config.model.attention_impl = 'xla'
  assert models.spec('vit_s16').attributes(config.model)['attention'] == 'xla'
  assert models.spec('swin_t').attributes(config.model)['attention'] == 'xla'


@pytest.mark.parametrize('bias_items', [0, 6, 3])
def test_dot_product_attention_gives_the_einsums_numbers_and_gradients(bias_items):
  """No bias, one per item, and one per window (3 items per image, 2 images: item n takes bias[n % 3])."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (6, 2, 10, 8)) for key in keys[:3])
  bias = 3.0 * jax.random.normal(keys[3], (bias_items, 1, 10, 10)) if bias_items else None
  if bias_items == 3:  # the per-window bias means the per-item one repeated over the images
    np.testing.assert_array_equal(models.attend(q, k, v, bias), models.attend(q, k, v, jnp.tile(bias, (2, 1, 1, 1))))
    with pytest.raises(ValueError, match='must divide'):
      models.attend(q[:4], k[:4], v[:4], bias)

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.sin(models.attend(q, k, v, bias, impl=impl)))
  want = models.attend(q, k, v, bias, impl='einsum')
  want_grads = jax.grad(loss('einsum'), argnums=(0, 1, 2))(q, k, v)
  for impl in ('xla', 'dot_product'):
    _close(models.attend(q, k, v, bias, impl=impl), want)
    _close(jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v), want_grads)
  with pytest.raises(ValueError, match='attention implementation'):
    models.attend(q, k, v, impl='flash')


def test_dot_product_attention_takes_its_inputs_in_the_given_dtype():
  """bfloat16 inputs (what cuDNN's kernel takes) for a float32 caller: float32 out, bfloat16's precision."""
  q, k, v = (jax.random.normal(key, (2, 2, 9, 8)) for key in jax.random.split(jax.random.PRNGKey(2), 3))
  bias = jnp.linspace(-1.0, 1.0, 81).reshape(1, 1, 9, 9)
  want = models.attend(q, k, v, bias)
  got = models.attend(q, k, v, bias, impl='xla', dtype=jnp.bfloat16)
  assert got.dtype == jnp.float32
  exact = models.attend(q, k, v, bias, impl='xla')
  error = float(jnp.max(jnp.abs(got - want)))
  assert float(jnp.max(jnp.abs(exact - want))) < 1e-5 < error < 0.05  # rounded to bfloat16, no more


@pytest.mark.parametrize('family', ['vit', pytest.param('swin', marks=pytest.mark.slow)])
def test_vit_and_swin_give_the_same_logits_and_gradients_with_either_attention(family):
  """The tiny Swin has a shifted, masked window stage: the mask reaches the attention in both."""
  build = helpers.tiny_vit if family == 'vit' else helpers.tiny_swin
  einsum, xla = build(attention='einsum'), build(attention='xla')
  variables = helpers.init(einsum)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))

  @functools.partial(jax.jit, static_argnums=0)
  def outputs(model_impl, params):
    model = xla if model_impl == 'xla' else einsum
    out = {branch: model.apply({**variables, 'params': params}, x, branch=branch) for branch in ('adv', 'nat')}
    out['grads'] = jax.grad(lambda p: jnp.sum(model.apply({**variables, 'params': p}, x) ** 2))(params)
    return out
  _close(outputs('xla', variables['params']), outputs('einsum', variables['params']))
