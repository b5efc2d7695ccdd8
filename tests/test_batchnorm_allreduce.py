"""Synchronised BatchNorm with one collective per layer: 4 fake devices compute what 1 device computes on the
whole batch (statistics, outputs, running statistics and gradients within 1e-6), and the forward pass of a
BatchNorm layer holds exactly one collective (the statistics), its gradient one more."""

import json

from tests import helpers

CODE = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from autolora_jax import models
from autolora_jax.models.batchnorm import batch_statistics

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
x = (1.5 + 3.0 * rng.standard_normal((16, 5, 5, 8))).astype(np.float32)
# Large, offset activations: a difference of sums (E[x^2] - E[x]^2) would lose digits here.
big = (300.0 + 0.5 * rng.standard_normal((16, 5, 5, 8))).astype(np.float32)
w = rng.standard_normal((16, 5, 5, 8)).astype(np.float32)
bn = models.BatchNorm(use_running_average=False, axis_name='d')
variables = models.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x[:2])
variables = {'params': {'scale': jnp.linspace(0.5, 2.0, 8), 'bias': jnp.linspace(-1.0, 1.0, 8)},
             'batch_stats': variables['batch_stats']}

def forward(params, x, w):
  y, upd = bn.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, mutable=['batch_stats'])
  return jnp.sum(y * w) / 16, (y, upd['batch_stats'])

def step(params, x, w):
  (loss, (y, stats)), (gp, gx) = jax.value_and_grad(forward, argnums=(0, 1), has_aux=True)(params, x, w)
  return y, stats, jax.lax.psum(gp, 'd'), gx, batch_statistics(x, 'd')

def run(devices):
  n = len(devices)
  f = jax.pmap(step, axis_name='d', in_axes=(None, 0, 0), devices=devices)
  y, stats, gp, gx, (mean, var, count) = f(variables['params'], x.reshape(n, -1, 5, 5, 8),
                                           w.reshape(n, -1, 5, 5, 8))
  return {'y': np.asarray(y).reshape(x.shape), 'gx': np.asarray(gx).reshape(x.shape),
          'ra_mean': np.asarray(stats['mean'][0]), 'ra_var': np.asarray(stats['var'][0]),
          'g_scale': np.asarray(gp['scale'][0]), 'g_bias': np.asarray(gp['bias'][0]),
          'mean': np.asarray(mean[0]), 'var': np.asarray(var[0]), 'count': int(np.asarray(count).ravel()[0])}

one, four = run(jax.devices()[:1]), run(jax.devices())
_, big_var, _ = jax.pmap(lambda x: batch_statistics(x, 'd'), axis_name='d')(big.reshape(4, -1, 5, 5, 8))
exact_var = np.var(big.astype(np.float64), axis=(0, 1, 2))
grad_x = jax.grad(lambda x, w: forward(variables['params'], x, w)[0])
jaxpr = str(jax.make_jaxpr(jax.pmap(grad_x, axis_name='d'))(x.reshape(4, -1, 5, 5, 8), w.reshape(4, -1, 5, 5, 8)))
fwd = str(jax.make_jaxpr(jax.pmap(lambda x: batch_statistics(x, 'd'), axis_name='d'))(x.reshape(4, -1, 5, 5, 8)))
collectives = ('all_gather', 'psum', 'pmean', 'all_reduce', 'reduce_scatter', 'psum_scatter', 'all_to_all')
count = lambda text: sum(text.count(c + '[') for c in collectives)
print(json.dumps({'diff': {k: float(np.max(np.abs(one[k] - four[k]) / np.maximum(1.0, np.abs(one[k]))))
                           for k in one if k != 'count'},
                  'counts': [one['count'], four['count']],
                  'var_error': float(np.max(np.abs(np.asarray(big_var[0]) - exact_var) / exact_var)),
                  'forward_collectives': count(fwd), 'gradient_collectives': count(jaxpr)}))
'''


def test_four_devices_match_one_device_with_one_collective_per_layer():
  proc = helpers.run_python(CODE, devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['counts'] == [400, 400]
  for key, diff in result['diff'].items():  # relative to max(1, |value|)
    assert diff < 1e-6, (key, diff)
  assert result['var_error'] < 1e-5  # as exact as two passes on one device
  assert result['forward_collectives'] == 1
  assert result['gradient_collectives'] == 2, result  # the forward's and its transpose
