"""The LoRa ResNet: docs/method.md's dW formula, branches, placement, convolution paths and the input resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from autolora_jax import models, ops
from tests import helpers


def _flat(params):
  return traverse_util.flatten_dict(params, sep='/')


def test_lora_delta_matches_spec_formula_in_pytorch_order():
  """dW = reshape(B @ A, (C_out, C_in, k, k)) * alpha / r, then OIHW -> HWIO, computed independently."""
  rng = np.random.default_rng(0)
  c_out, c_in, k, r, alpha = 6, 4, 3, 2, 1.0
  a = rng.normal(size=(r * k, c_in * k)).astype(np.float32)
  b = rng.normal(size=(c_out * k, r * k)).astype(np.float32)
  expected_oihw = np.zeros((c_out, c_in, k, k), np.float32)
  product = b @ a  # (c_out * k, c_in * k)
  flat = product.reshape(-1)  # row-major, as torch's .view
  for o in range(c_out):
    for i in range(c_in):
      for h in range(k):
        for w in range(k):
          expected_oihw[o, i, h, w] = flat[((o * c_in + i) * k + h) * k + w] * alpha / r
  got = models.lora_delta(jnp.asarray(a), jnp.asarray(b), (k, k, c_in, c_out), alpha / r)
  np.testing.assert_allclose(np.asarray(got), expected_oihw.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)


def test_lora_shapes_and_initialisation():
  model = helpers.tiny_resnet18(lora_rank=4)
  params = _flat(helpers.init(model)['params'])
  kernel = params['layer2_0/conv1/kernel']  # (3, 3, C_in=8, C_out=16)
  assert kernel.shape == (3, 3, 8, 16)
  assert params['layer2_0/conv1/lora_A'].shape == (4 * 3, 8 * 3)
  assert params['layer2_0/conv1/lora_B'].shape == (16 * 3, 4 * 3)
  assert params['layer2_0/downsample_conv/lora_A'].shape == (4 * 1, 8 * 1)
  assert np.all(np.asarray(params['layer2_0/conv1/lora_B']) == 0)
  big = helpers.init(models.resnet18(3, width=64, input_size=16, stem='cifar'))['params']
  a = np.asarray(big['layer4_1']['conv2']['lora_A'])  # N(0, 1): 24 x 1536 draws
  assert abs(a.mean()) < 0.02 and abs(a.std() - 1.0) < 0.02


def test_no_lora_on_stem_or_head_and_placement_all():
  params = _flat(helpers.init(helpers.tiny_resnet18())['params'])
  lora_owners = {k.rsplit('/', 1)[0] for k in params if k.endswith('lora_A')}
  assert not any(k.startswith(('conv1', 'bn1', 'head')) for k in lora_owners)
  convs = {k.rsplit('/', 1)[0] for k in params if k.endswith('/kernel') and k.startswith('layer')}
  assert lora_owners == convs  # every block conv and projection shortcut
  assert any('downsample_conv' in k for k in lora_owners)


def test_placement_last_block_only():
  params = _flat(helpers.init(helpers.tiny_resnet18(lora_placement='last_block'))['params'])
  owners = {k.rsplit('/', 1)[0] for k in params if k.endswith('lora_A')}
  assert owners == {f'layer{i}_1/conv{j}' for i in range(1, 5) for j in (1, 2)}


@pytest.mark.slow
def test_resnet50_lora_on_bottleneck_convs():
  model = models.resnet50(3, width=8, input_size=16, stem='cifar', lora_rank=2)
  params = _flat(helpers.init(model)['params'])
  assert params['layer1_0/conv3/kernel'].shape == (1, 1, 8, 32)
  assert params['layer1_0/conv3/lora_B'].shape == (32, 2)
  assert 'layer3_5/conv2/lora_A' in params and 'layer4_2/conv3/lora_A' in params
  logits = model.apply(helpers.init(model), jnp.zeros((2, 16, 16, 3)))
  assert logits.shape == (2, 3)


def test_branches_equal_at_init_and_differ_with_nonzero_b():
  model = helpers.tiny_resnet18()
  variables = helpers.init(model)
  x = jnp.asarray(helpers.random_batch()['image'])
  adv = model.apply(variables, x, branch='adv')
  nat = model.apply(variables, x, branch='nat')
  np.testing.assert_array_equal(np.asarray(adv), np.asarray(nat))
  changed = helpers.with_nonzero_lora_b(variables)
  np.testing.assert_array_equal(np.asarray(model.apply(changed, x, branch='adv')), np.asarray(adv))
  assert float(jnp.max(jnp.abs(model.apply(changed, x, branch='nat') - adv))) > 1e-3


def test_no_lora_parameters_with_rank_zero():
  params = helpers.init(helpers.tiny_resnet18(lora_rank=0))['params']
  assert models.lora_params_count(params) == 0


def test_unknown_branch_is_an_error():
  model = helpers.tiny_resnet18()
  with pytest.raises(ValueError, match='branch'):
    model.apply(helpers.init(model), jnp.zeros((1, 16, 16, 3)), branch='natural')


@pytest.mark.parametrize('impl', ['im2col', 'explicit'])
@pytest.mark.parametrize('k,stride,padding,size', [(3, 1, 1, 8), (3, 2, 1, 9), (7, 2, 3, 16), (1, 2, 0, 8)])
def test_convolution_paths_equal_native(impl, k, stride, padding, size):
  rng = np.random.default_rng(k + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size, 5)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, 5, 4)).astype(np.float32))
  conv_fn = ops.cpu.CONVS[impl]
  native = models.native_conv2d(x, w, stride, padding)
  other = conv_fn(x, w, stride, padding)
  np.testing.assert_allclose(np.asarray(other), np.asarray(native), rtol=1e-4, atol=1e-4)

  def grads(conv_fn):
    return jax.grad(lambda x, w: jnp.sum(conv_fn(x, w, stride, padding) ** 2), (0, 1))(x, w)

  for g_other, g_native in zip(grads(conv_fn), grads(models.native_conv2d)):  # input and kernel gradients
    np.testing.assert_allclose(np.asarray(g_other), np.asarray(g_native), rtol=1e-3, atol=1e-3)


def test_max_pool_paths_agree():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32))
  native = lambda x: models.native_max_pool(x, 3, 2, 1)  # noqa: E731
  for impl in ('im2col', 'explicit'):
    pool_fn = ops.convolutions(impl, 'cpu')[1]
    pool = lambda x: pool_fn(x, 3, 2, 1)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(pool(x)), np.asarray(native(x)))
    g = jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)
    g_native = jax.grad(lambda x: jnp.sum(native(x) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_native), rtol=1e-6, atol=1e-6)


def test_models_agree_across_conv_impls():
  x = jnp.asarray(helpers.random_batch()['image'])
  native = helpers.tiny_resnet18(conv_impl='native')
  variables = helpers.with_nonzero_lora_b(helpers.init(native))
  for impl in ('im2col', 'explicit', 'auto'):
    for branch in ('adv', 'nat'):
      a = native.apply(variables, x, branch=branch)
      b = helpers.tiny_resnet18(conv_impl=impl).apply(variables, x, branch=branch)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_the_model_never_asks_for_the_backend(monkeypatch):
  # The CPU per-layer choice at 64 x 64 with the ImageNet stem: im2col, Winograd and explicit layers, and
  # ops' max-pool; tracing init and a gradient must not call jax.default_backend().
  conv_fn, pool_fn = ops.convolutions('auto', 'cpu')
  model = models.resnet18(3, width=64, input_size=64, conv_fn=conv_fn, pool_fn=pool_fn)

  def refuse():
    raise AssertionError('jax.default_backend() called while tracing the model')

  monkeypatch.setattr(jax, 'default_backend', refuse)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  jax.eval_shape(jax.grad(lambda v, x: jnp.sum(model.apply(v, x, branch='nat'))), variables, x)


def test_nearest_resize_follows_pytorch_index_rule():
  x = jnp.arange(5.0).reshape(1, 5, 1, 1) * jnp.ones((1, 5, 5, 1))
  up = models.torch_nearest_resize(x, 7)  # torch: src = floor(dst * 5 / 7)
  np.testing.assert_array_equal(np.asarray(up[0, :, 0, 0]), [0, 0, 1, 2, 2, 3, 4])
  down = models.torch_nearest_resize(jnp.arange(8.0).reshape(1, 8, 1, 1) * jnp.ones((1, 8, 8, 1)), 3)
  np.testing.assert_array_equal(np.asarray(down[0, :, 0, 0]), [0, 2, 5])  # floor(i * 8 / 3)
  x32 = jnp.asarray(np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32))
  big = models.torch_nearest_resize(x32, 224)
  np.testing.assert_array_equal(np.asarray(big[0, ::7, ::7]), np.asarray(x32[0]))


def test_input_is_clamped_and_normalised_inside_the_model():
  model = helpers.tiny_resnet18()
  variables = helpers.init(model)
  x = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
  out_of_range = x.copy()
  out_of_range[0, 0, 0] = [1.7, -0.4, 3.0]
  clipped = np.clip(out_of_range, 0, 1)
  np.testing.assert_array_equal(np.asarray(model.apply(variables, out_of_range)),
                                np.asarray(model.apply(variables, clipped)))


def test_batchnorm_train_mode_uses_batch_stats_and_unbiased_running_var():
  bn = models.BatchNorm(use_running_average=False)
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(4, 3, 3, 2)).astype(np.float32))
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, upd = bn.apply(variables, x, mutable=['batch_stats'])
  xn = np.asarray(x).reshape(-1, 2)
  mean, var = xn.mean(0), xn.var(0)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), (xn - mean) / np.sqrt(var + 1e-5), atol=1e-5)
  n = xn.shape[0]
  np.testing.assert_allclose(np.asarray(upd['batch_stats']['mean']), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(upd['batch_stats']['var']), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
