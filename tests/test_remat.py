"""config.model.remat='forwards': the loss's forward passes recomputed in turn (autolora_jax/remat.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import remat, steps
from autolora_jax.errors import ConfigError
from tests import helpers


def _two_pass_loss(forward):
  """A loss of two calls of a 12-layer MLP whose activations (4096 x 256 floats, 4 MiB a layer) dominate."""

  def loss(params, x1, x2):
    z1 = forward(params, {}, x1)
    z2 = forward(params, {}, x2)
    return jnp.sum(z1 ** 2) + jnp.sum(jnp.tanh(z2))

  return loss


def _mlp(params, stats, x):
  h = x
  for w in params:
    h = jnp.tanh(h @ w)
  return h


def _mlp_params():
  return [jax.random.normal(k, (256, 256)) * 0.1 for k in jax.random.split(jax.random.PRNGKey(0), 12)]


def test_in_turn_gives_the_plain_gradient_and_halves_the_planned_memory():
  """Same gradient within 1e-6 of its scale; XLA's buffer plan for the gradient's temporaries at most 0.7x
  the plain one's (the activations of one call instead of two; the ordering by data dependency holds)."""
  params = _mlp_params()
  x1, x2 = jax.random.normal(jax.random.PRNGKey(1), (2, 4096, 256))

  def plan_and_grad(make_forward):  # in_turn numbers its calls: made inside the traced function, as the step does
    fn = jax.jit(jax.grad(lambda p, a, b: _two_pass_loss(make_forward())(p, a, b)))
    compiled = fn.lower(params, x1, x2).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled(params, x1, x2)

  plain_bytes, plain = plan_and_grad(lambda: _mlp)
  turned_bytes, grads = plan_and_grad(lambda: remat.in_turn(_mlp))
  for a, b in zip(plain, grads):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6 * float(jnp.max(jnp.abs(a))))
  assert turned_bytes <= 0.7 * plain_bytes, (turned_bytes, plain_bytes)


def _one_step(model, remat_mode, variables):
  tx = steps.make_optimizer(0.05, 0.9, 1e-4)
  state = steps.create_train_state(model, variables, tx, l1=0.4, l2=2.0)
  step = jax.jit(steps.make_train_step(model, eps=8 / 255, step_size=2 / 255, steps=2,
                                       axis_name=None, remat=remat_mode))
  return step(state, helpers.random_batch(size=model.input_size), jax.random.PRNGKey(0))


@pytest.mark.parametrize('make_model,kwargs', [
    (helpers.tiny_resnet18, {}),  # BatchNorm: the statistics of the loss's forwards are the plain step's
    (helpers.tiny_convnext, {'drop_path': 0.3}),  # stochastic depth: the recomputation drops what the pass did
], ids=['resnet', 'convnext_drop_path'])
def test_train_step_with_recomputed_forwards_is_the_plain_step(make_model, kwargs):
  model = make_model(**kwargs)
  variables = helpers.with_nonzero_lora_b(helpers.init(model, size=model.input_size))
  plain_state, plain_metrics = _one_step(model, 'none', variables)
  state, metrics = _one_step(model, 'forwards', variables)
  for key in ('loss', 'ce_nat', 'ce_adv', 'kl', 'grad_norm'):
    np.testing.assert_allclose(float(metrics[key]), float(plain_metrics[key]), rtol=1e-5, err_msg=key)
  for name, tree, plain_tree in (('params', state.params, plain_state.params),
                                 ('batch_stats', state.batch_stats, plain_state.batch_stats)):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain_tree), jax.tree_util.tree_leaves(tree)):
      scale = max(float(np.max(np.abs(np.asarray(a)))), 1e-3)
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale,
                                 err_msg=name + jax.tree_util.keystr(path))


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match="remat='blocks'"):
    steps.make_train_step(helpers.tiny_vit(), eps=0.1, step_size=0.1, steps=1, remat='blocks')
  from autolora_jax import config_checks
  from autolora_jax.configs import default
  config = default.get_config()
  config.model.remat = 'all'
  with pytest.raises(ConfigError, match=r"config.model.remat='all' is not supported: choose one of \('none', "
                                        r"'forwards'\)"):
    config_checks.validate(config)
