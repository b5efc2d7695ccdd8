"""ops.winograd: F(2 x 2, 3 x 3) and F(4 x 4, 3 x 3) are exact (float64), and in float32 their values and
both gradients stay within a stated tolerance of XLA's convolution; ops.cpu picks the tile by the output side.

Float32 tolerances, relative to the largest entry: 1e-5 for m = 2 and 5e-5 for m = 4 (observed on
random data: ~6e-7 and ~6e-6; the transforms of F(4 x 4) multiply by up to 8 and 1/24).
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from autolora_jax.ops import conv, cpu, winograd

TOLERANCE = {2: 1e-5, 4: 5e-5}


def _native(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


# Sides that are and are not multiples of the tile, non-square, and smaller than one tile.
SHAPES = [(2, 8, 8, 3, 5), (1, 7, 7, 4, 6), (2, 9, 6, 2, 3), (1, 3, 5, 3, 2), (1, 1, 1, 2, 2)]


@pytest.mark.slow
@pytest.mark.parametrize('m', [2, 4])
def test_winograd_is_exact_in_float64(m):
  with jax.enable_x64(True):
    for i, (n, h, w, c, k) in enumerate(SHAPES):
      x = jax.random.normal(jax.random.PRNGKey(i), (n, h, w, c), jnp.float64)
      kernel = jax.random.normal(jax.random.PRNGKey(100 + i), (3, 3, c, k), jnp.float64)
      got = winograd.conv3x3(x, kernel, m)
      assert got.dtype == jnp.float64 and got.shape == (n, h, w, k)
      assert _rel(_native(x, kernel), got) < 1e-12, (m, (n, h, w, c, k))


@pytest.mark.parametrize('m', [2, 4])
def test_winograd_values_and_gradients_match_xla_in_float32(m):
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 12, 10, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 24)) * 0.1
  g = jax.random.normal(jax.random.PRNGKey(2), (4, 12, 10, 24))
  ref, ref_vjp = jax.vjp(_native, x, kernel)
  got, got_vjp = jax.vjp(lambda x, w: winograd.conv3x3(x, w, m), x, kernel)
  assert _rel(ref, got) < TOLERANCE[m]
  for name, a, b in zip(('dx', 'dw'), ref_vjp(g), got_vjp(g)):
    assert a.shape == b.shape
    assert _rel(a, b) < TOLERANCE[m], (m, name, _rel(a, b))


def test_winograd_rejects_other_tiles_and_kernels():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match='tile'):
    winograd.conv3x3(x, jnp.zeros((3, 3, 2, 2)), 3)
  with pytest.raises(ValueError, match='3 x 3'):
    winograd.conv3x3(x, jnp.zeros((5, 5, 2, 2)), 2)


def test_the_cpu_choice_picks_the_winograd_tile_by_output_side():
  tiles = {side: cpu.winograd_tile(side) for side in (3, 4, 7, 14, 19, 20, 28, 39, 40, 56, 112)}
  assert tiles == {3: 0, 4: 2, 7: 2, 14: 2, 19: 2, 20: 4, 28: 4, 39: 4, 40: 2, 56: 2, 112: 2}
  assert cpu.choose_conv(28, 3, stride=1) == 'winograd'
  assert cpu.choose_conv(28, 3, stride=2) == 'explicit'
  assert cpu.choose_conv(112, 7, stride=2) == 'explicit'
  # conv_impl='winograd' runs other convolutions as 'explicit': same values as XLA's.
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
  for stride, padding in [(2, 1), (1, 0)]:
    ref = conv.xla_conv(x, w, stride, padding)
    assert _rel(ref, cpu.winograd_conv(x, w, stride, padding)) < 1e-6
