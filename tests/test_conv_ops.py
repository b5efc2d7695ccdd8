"""ops.conv: the scatter is the exact transpose of the strided views, max-pool ties go to the first maximum;
ops.cpu picks per layer what 'auto' always picked; and through a whole network the CPU convolutions give
XLA's values and input and parameter gradients (tests/test_models.py compares single convolutions and
pooling values).

Tolerance through a whole network, from the arithmetic: every implementation is a float32 evaluation of
the same sums in another order, so each is compared with the exact result (the network in float64, with
XLA's convolution) and may be at most ERROR_RATIO times as far from it as XLA's own float32 convolution
is (relative to the largest entry; a floor of FLOOR_EPS float32 epsilons where XLA's happens to be
nearly exact). Observed on a 2-core AVX2 machine: at most 2.1 times, errors up to 8e-5 (BatchNorm scale
and bias gradients, which divide by small batch variances); a wrong tap order or Winograd transform is
off by O(1).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import models, ops
from autolora_jax.ops import conv, cpu

ERROR_RATIO = 16
FLOOR_EPS = 8


def test_scatter_taps_is_the_transpose_of_tap_views():
  # <tap_views(x), t> == <x, scatter_taps(t)> for every stride/kernel pairing, odd sizes included.
  for k, s, side in [(3, 2, 9), (7, 2, 12), (3, 1, 6), (2, 3, 8), (1, 2, 5)]:
    out = (side - k) // s + 1
    x = jax.random.normal(jax.random.PRNGKey(0), (1, side, side, 2))
    taps = [jax.random.normal(jax.random.PRNGKey(i + 1), (1, out, out, 2)) for i in range(k * k)]

    @jax.jit
    def products(x, taps, k=k, s=s, side=side, out=out):
      lhs = sum(jnp.vdot(v, t) for v, t in zip(conv.tap_views(x, k, s, (out, out)), taps))
      return lhs, jnp.vdot(x, conv.scatter_taps(taps, k, s, (side, side)))

    lhs, rhs = products(x, taps)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def _pool_ref(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_window():
  # Integer inputs in {0, 1} (as after a ReLU): most windows hold several equal maxima.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 9, 9, 2)), jnp.float32)
  g = jnp.ones((2, 5, 5, 2))
  dx = jax.vjp(lambda x: conv.max_pool(x, 3, 2, 1), x)[1](g)[0]
  np.testing.assert_array_equal(dx, jax.vjp(_pool_ref, x)[1](g)[0])
  # The top-left window of an all-equal image sends its gradient to pixel (0, 0) alone.
  pool = lambda x: conv.max_pool(x, 3, 2, 1)  # noqa: E731
  flat = jax.vjp(pool, jnp.zeros((1, 4, 4, 1)))[1](jnp.ones((1, 2, 2, 1)))[0]
  np.testing.assert_array_equal(flat[0, :, :, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_choose_conv_on_cpu():
  assert cpu.choose_conv(cpu.IM2COL_MAX_SIDE, 3) == 'im2col'
  assert cpu.choose_conv(cpu.IM2COL_MAX_SIDE + 1, 3) == 'winograd'
  assert cpu.choose_conv(cpu.IM2COL_MAX_SIDE + 1, 3, stride=2) == 'explicit'
  assert cpu.choose_conv(112, 7, stride=2) == 'explicit'
  assert cpu.choose_conv(56, 1) == 'im2col'
  narrow = cpu.NARROW_CHANNELS - 1
  assert cpu.choose_conv(16, 3, channels=narrow) == 'im2col'
  assert cpu.choose_conv(16, 3, channels=narrow + 1) == 'winograd'
  assert cpu.choose_conv(16, 3, stride=2, channels=narrow) == 'im2col'


def test_convolutions_by_conv_impl_and_backend():
  native = (conv.xla_conv, conv.xla_max_pool)
  assert ops.convolutions('native', 'cpu') == native
  assert ops.convolutions('auto', 'gpu') == native and ops.convolutions('auto', 'tpu') == native
  assert ops.convolutions('auto', 'cpu') == (cpu.auto_conv, conv.max_pool)
  assert ops.convolutions('im2col', 'gpu') == (conv.im2col_conv, conv.max_pool)
  assert ops.convolutions('explicit', 'cpu') == (conv.conv_explicit, conv.max_pool)
  assert ops.convolutions('winograd', 'cpu') == (cpu.winograd_conv, conv.max_pool)
  with pytest.raises(ValueError, match='conv_impl'):
    ops.convolutions('fast', 'cpu')


def test_auto_conv_runs_the_chosen_implementation(monkeypatch):
  # The layer's output side, kernel, stride and wider channel count decide, as choose_conv says.
  calls = []
  for name in ('im2col', 'winograd', 'explicit'):
    monkeypatch.setitem(cpu.CONVS, name, lambda *args, _name=name: calls.append(_name))
  x64 = jnp.zeros((1, 8, 8, 64))
  cpu.auto_conv(x64, jnp.zeros((3, 3, 64, 64)), 1, 1)  # 8 x 8 output, 64 channels: F(2 x 2)
  cpu.auto_conv(x64, jnp.zeros((3, 3, 64, 128)), 2, 1)  # 4 x 4 output, strided
  cpu.auto_conv(x64, jnp.zeros((1, 1, 64, 128)), 2, 0)  # 1 x 1 kernel
  cpu.auto_conv(x64, jnp.zeros((3, 3, 64, 32)), 4, 1)  # 2 x 2 output
  cpu.auto_conv(jnp.zeros((1, 8, 8, 8)), jnp.zeros((3, 3, 8, 32)), 1, 1)  # narrow
  cpu.auto_conv(jnp.zeros((1, 8, 8, 8)), jnp.zeros((3, 3, 8, 64)), 1, 1)  # the wider side counts
  assert calls == ['winograd', 'explicit', 'im2col', 'im2col', 'im2col', 'winograd']


def _network_inputs(stem):
  """Images and variables (non-zero LoRa B, so that the branches differ) of a width-8 ResNet-18."""
  model = models.resnet18(5, width=8, input_size=32, stem=stem)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if 'lora_B' in jax.tree_util.keystr(p) else v, variables['params'])
  return x, {'params': params, 'batch_stats': variables['batch_stats']}


def _network_outputs(model, x, variables):
  """Logits of both branches, input gradient (as PGD) and train-mode parameter gradients, as numpy."""
  y = jnp.arange(4) % 5

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

  return jax.device_get(outputs(variables))


@pytest.mark.slow
@pytest.mark.parametrize('stem', ['imagenet', 'cifar'])
def test_network_gives_the_same_results_with_auto_and_native_convs(stem):
  # 'auto' on CPU: this width-8 network is narrow (cpu.NARROW_CHANNELS), so im2col everywhere and
  # conv.max_pool. 'winograd': ImageNet stem: the 7 x 7 stem and strided 3 x 3 convolutions explicit,
  # the 3 x 3 stride-1 ones Winograd F(2 x 2) at 8 x 8 to 1 x 1; CIFAR stem: Winograd F(4 x 4) at 32 x 32,
  # F(2 x 2) at 16 x 16 to 4 x 4.
  x, variables = _network_inputs(stem)
  model = models.resnet18(5, width=8, input_size=32, stem=stem)
  with jax.enable_x64(True):  # the exact result: the same network and inputs in float64, XLA's convolution
    exact = _network_outputs(model.clone(dtype=jnp.float64), *jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64), (x, variables)))
  runs = {impl: _network_outputs(model.clone(conv_fn=c, pool_fn=p), x, variables)
          for impl in ('native', 'auto', 'winograd') for c, p in [ops.convolutions(impl, 'cpu')]}
  eps = float(jnp.finfo(jnp.float32).eps)
  for key in exact:
    got = {impl: jax.tree_util.tree_leaves(runs[impl][key]) for impl in runs}
    for i, (path, ref) in enumerate(jax.tree_util.tree_leaves_with_path(exact[key])):
      assert ref.dtype == np.float64, (key, jax.tree_util.keystr(path))
      scale = max(float(np.max(np.abs(ref))), 1e-30)  # leaves that are exactly 0 must stay 0
      error = {impl: float(np.max(np.abs(got[impl][i] - ref))) / scale for impl in runs}
      bound = ERROR_RATIO * max(error['native'], FLOOR_EPS * eps)
      for impl in ('auto', 'winograd'):
        assert error[impl] <= bound, (impl, key, jax.tree_util.keystr(path), error, bound)
