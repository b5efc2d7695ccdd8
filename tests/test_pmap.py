"""The pmapped train step: 4 devices train the same model as 1 device on the same global batches.

PGD's sign step would turn float rounding differences, which depend on the per-device batch size and on the
CPU's vector width, into whole steps of 2/255 on a few pixels (on an AVX2 machine: 7.5e-5 in the parameters
after two steps); so the attack here takes steps of size 0 and keeps its random start, which is drawn per
example and the same for any number of devices. What is compared is the sharding of the batch, the
synchronised BatchNorm, the averaged gradients and the update.
"""

import json

import pytest

from tests import helpers

CODE = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from autolora_jax import pretrain, steps
from flax import jax_utils
from tests import helpers

assert jax.device_count() == 4, jax.devices()
METHOD = '__METHOD__'
if METHOD == 'vit':  # AutoLoRa on a ViT (no BatchNorm: what is synchronised is the gradient alone)
  model, METHOD = helpers.tiny_vit(), 'autolora'
elif METHOD in ('convnext', 'swin'):  # the same on a ConvNeXt, a Swin (at 16x16 inputs resized to 32 inside);
  # the ConvNeXt with stochastic depth, drawn per example (and its loss compared with the model without it)
  model = helpers.tiny_convnext(drop_path=0.5) if METHOD == 'convnext' else helpers.tiny_swin()
  METHOD = 'autolora'
else:
  model = helpers.tiny_resnet18(**(dict(lora_rank=0, twin_bn=True) if METHOD == 'twins' else {}))
variables = pretrain.init_variables(model, 16, 0)  # one jitted program, not one per operation
if getattr(model, 'drop_path', 0.0):  # layer scales 0.5, not 1e-6: the dropped branches count
  variables = jax.tree_util.tree_map_with_path(lambda p, v: v * 5e5 if p[-1].key == 'gamma' else v, variables)
tx = steps.make_optimizer(0.05, 0.9, 1e-4)
state = steps.create_train_state(model, variables, tx, l1=0.3, l2=4.0)
step = steps.make_train_step(model, method=METHOD, eps=8 / 255, step_size=0.0, steps=3)
batches = [helpers.random_batch(n=16, seed=s) for s in (1, 2)]

def train(devices, step=step):
  p_step = jax.pmap(step, axis_name=steps.AXIS, in_axes=(0, 0, None), devices=devices)
  # placed as the step's outputs are (loop.replicate's placement on these devices): one compilation, not two
  canonical = jax.pmap(lambda t: t, axis_name=steps.AXIS, devices=devices)
  s = canonical(jax_utils.replicate(state, devices=devices))
  for i, batch in enumerate(batches):
    sharded = {k: v.reshape((len(devices), -1) + v.shape[1:]) for k, v in batch.items()}
    s, metrics = p_step(s, sharded, jax.random.PRNGKey(i))
  first = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), s)
  return first, jax.tree_util.tree_map(lambda a: np.asarray(a), s), {k: float(v[0]) for k, v in metrics.items()}

one, _, m1 = train(jax.devices()[:1])
four, all4, m4 = train(jax.devices())
diff = lambda a, b: max((float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))), default=0.0)
replicas = max(float(np.max(np.abs(a - a[:1]))) for a in jax.tree_util.tree_leaves(all4))
out = {'params': diff(one.params, four.params), 'batch_stats': diff(one.batch_stats, four.batch_stats),
       'opt_state': diff(one.opt_state, four.opt_state), 'replicas': replicas,
       'loss': abs(m1['loss'] - m4['loss']), 'moved': diff(one.params, state.params)}
if getattr(model, 'drop_path', 0.0):
  plain = steps.make_train_step(model.clone(drop_path=0.0), method=METHOD, eps=8 / 255, step_size=0.0, steps=3)
  out['drop_path_changed_loss'] = abs(m1['loss'] - train(jax.devices()[:1], plain)[2]['loss'])
print(json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.parametrize('method', ['autolora', 'twins', 'vit', 'convnext', 'swin'])
def test_four_devices_match_one_device(method):
  """AutoLoRa, TWINS (its halves: the even and odd positions of the global batch on any device count;
  only the adaptive BNs' statistics are synchronised, the frozen ones use none), AutoLoRa on a ViT, a Swin
  and a ConvNeXt with stochastic depth (drawn per example from the examples' keys)."""
  proc = helpers.run_python(CODE.replace('__METHOD__', method), devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['moved'] > 1e-3  # the steps did train
  assert result['params'] < 1e-5 and result['batch_stats'] < 1e-5 and result['opt_state'] < 1e-5, result
  assert result['replicas'] == 0.0  # all four replicas hold the same state
  assert result['loss'] < 1e-5
  if method == 'convnext':
    assert result['drop_path_changed_loss'] > 1e-4  # stochastic depth did act (and devices split it alike)
