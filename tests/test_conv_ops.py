"""conv_ops: the scatter is the exact transpose of the strided views, max-pool ties go to the first maximum,
and a whole network's input and parameter gradients are XLA's (tests/test_models.py compares single
convolutions and pooling values).

Tolerance through a whole network: 1e-4 relative to the largest entry (observed <= 2.2e-5, in BatchNorm
scale gradients, which divide by small batch variances); float32 sums in another order, nothing else.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import conv_ops, models


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-12))


def test_scatter_taps_is_the_transpose_of_tap_views():
  # <tap_views(x), t> == <x, scatter_taps(t)> for every stride/kernel pairing, odd sizes included.
  for k, s, side in [(3, 2, 9), (7, 2, 12), (3, 1, 6), (2, 3, 8), (1, 2, 5)]:
    out = (side - k) // s + 1
    x = jax.random.normal(jax.random.PRNGKey(0), (1, side, side, 2))
    taps = [jax.random.normal(jax.random.PRNGKey(i + 1), (1, out, out, 2)) for i in range(k * k)]

    @jax.jit
    def products(x, taps, k=k, s=s, side=side, out=out):
      lhs = sum(jnp.vdot(v, t) for v, t in zip(conv_ops.tap_views(x, k, s, (out, out)), taps))
      return lhs, jnp.vdot(x, conv_ops.scatter_taps(taps, k, s, (side, side)))

    lhs, rhs = products(x, taps)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def _pool_ref(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_window():
  # Integer inputs in {0, 1} (as after a ReLU): most windows hold several equal maxima.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 9, 9, 2)), jnp.float32)
  g = jnp.ones((2, 5, 5, 2))
  dx = jax.vjp(lambda x: conv_ops.max_pool(x, 3, 2, 1), x)[1](g)[0]
  np.testing.assert_array_equal(dx, jax.vjp(_pool_ref, x)[1](g)[0])
  # The top-left window of an all-equal image sends its gradient to pixel (0, 0) alone.
  pool = lambda x: conv_ops.max_pool(x, 3, 2, 1)  # noqa: E731
  flat = jax.vjp(pool, jnp.zeros((1, 4, 4, 1)))[1](jnp.ones((1, 2, 2, 1)))[0]
  np.testing.assert_array_equal(flat[0, :, :, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_resolve_conv_impl_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert models.resolve_conv_impl('auto', models.IM2COL_MAX_SIDE, 3) == 'im2col'
  assert models.resolve_conv_impl('auto', models.IM2COL_MAX_SIDE + 1, 3) == 'winograd'
  assert models.resolve_conv_impl('auto', models.IM2COL_MAX_SIDE + 1, 3, stride=2) == 'explicit'
  assert models.resolve_conv_impl('auto', 112, 7, stride=2) == 'explicit'
  assert models.resolve_conv_impl('auto', 56, 1) == 'im2col'
  assert models.resolve_conv_impl('native', 2, 3) == 'native'
  narrow = models.NARROW_CHANNELS - 1
  assert models.resolve_conv_impl('auto', 16, 3, channels=narrow) == 'im2col'
  assert models.resolve_conv_impl('auto', 16, 3, channels=narrow + 1) == 'winograd'
  assert models.resolve_conv_impl('auto', 16, 3, stride=2, channels=narrow) == 'im2col'
  assert models.resolve_conv_impl('native', 16, 3, channels=narrow) == 'native'
  with pytest.raises(ValueError, match='conv_impl'):
    models.resolve_conv_impl('fast', 8, 3)


def _network_outputs(impl, stem):
  """Logits of both branches, input gradient (as PGD) and train-mode parameter gradients of a tiny ResNet."""
  model = models.resnet18(5, width=8, input_size=32, conv_impl=impl, stem=stem)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  y = jnp.arange(4) % 5
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  params = jax.tree_util.tree_map_with_path(  # non-zero LoRa B, so that the branches differ
      lambda p, v: v + 0.1 if 'lora_B' in jax.tree_util.keystr(p) else v, variables['params'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}

  def ce(logits):
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  def train_loss(p, branch):
    logits, _ = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, x, branch=branch,
                            train=True, mutable=['batch_stats'])
    return ce(logits)

  @jax.jit
  def outputs(variables):
    out = {b: model.apply(variables, x, branch=b) for b in ('adv', 'nat')}
    out['input_grad'] = jax.grad(lambda z: ce(model.apply(variables, z)))(x)
    for branch in ('adv', 'nat'):
      out[f'grads_{branch}'] = jax.grad(train_loss)(variables['params'], branch)
    return out

  return outputs(variables)


@pytest.mark.parametrize('stem', ['imagenet', 'cifar'])
def test_network_gives_the_same_results_with_auto_and_native_convs(stem):
  # 'auto' on CPU: this width-8 network is narrow (models.NARROW_CHANNELS), so im2col everywhere and
  # conv_ops.max_pool. 'winograd': ImageNet stem: the 7 x 7 stem and strided 3 x 3 convolutions explicit,
  # the 3 x 3 stride-1 ones Winograd F(2 x 2) at 8 x 8 to 1 x 1; CIFAR stem: Winograd F(4 x 4) at 32 x 32,
  # F(2 x 2) at 16 x 16 to 4 x 4.
  ref = _network_outputs('native', stem)
  for impl in ('auto', 'winograd'):
    got = _network_outputs(impl, stem)
    for key in ref:
      leaves = zip(jax.tree_util.tree_leaves_with_path(ref[key]), jax.tree_util.tree_leaves(got[key]))
      for (path, a), b in leaves:
        assert _rel(a, b) < 1e-4, (impl, key, jax.tree_util.keystr(path), _rel(a, b))
