"""The baselines (config.method = 'vanilla_rft', 'pgd_at'): model, loss, fixed policy, and one run end to end.

Tiny models (width-8 ResNet-18, 16x16 inputs, CIFAR stem), batches of 8, attacks of 1-2 steps.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import attacks, config_checks, experiment, losses, models, steps
from autolora_jax import policy as policy_lib
from autolora_jax.configs import default
from autolora_jax.errors import ConfigError

SIZE, CLASSES, N = 16, 5, 8


def tiny_config(method='autolora', **fixed):
  config = default.get_config()
  config.method = method
  config.model.width, config.model.input_size, config.model.stem = 8, SIZE, 'cifar'
  config.model.conv_impl = 'native'
  for k, v in fixed.items():
    config.fixed[k] = v
  return config


def batch(seed=0, n=N):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.random((n, SIZE, SIZE, 3), dtype=np.float32)),
          'label': jnp.asarray(rng.integers(0, CLASSES, n), jnp.int32),
          'index': jnp.arange(n, dtype=jnp.int32)}


def make_state(model, lr, l1, l2, seed=0):
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)))
  tx = steps.make_optimizer(lr, momentum=0.0, weight_decay=0.0)  # the update is -lr * gradient
  return steps.create_train_state(model, variables, tx, l1=l1, l2=l2)


def flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('method', ['vanilla_rft', 'pgd_at'])
def test_baselines_have_no_lora_parameters(method):
  config = tiny_config(method)
  assert config.model.lora_rank == 8  # the config's rank is ignored for the baselines
  model = experiment.create_model(config, CLASSES)
  shapes = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))['params']
  params = shapes(model)
  assert model.lora_rank == 0
  assert models.lora_params_count(params) == 0
  assert not [path for path, _ in jax.tree_util.tree_leaves_with_path(params) if 'lora' in str(path)]
  assert models.lora_params_count(shapes(experiment.create_model(tiny_config('autolora'), CLASSES))) > 0


@pytest.mark.slow
def test_vanilla_rft_natural_ce_gradient_reaches_the_fe():
  """With l1 = 1, l2 = 0 the loss is CE of the FE's own clean logits: its gradient updates the FE."""
  model = experiment.create_model(tiny_config('vanilla_rft'), CLASSES)
  lr = 0.1
  state = make_state(model, lr, l1=1.0, l2=0.0)
  b = batch()
  step = jax.jit(steps.make_train_step(model, method='vanilla_rft', eps=8 / 255, step_size=2 / 255, steps=1,
                                       axis_name=None))
  new_state, metrics = step(state, b, jax.random.PRNGKey(1))

  def natural_ce(params):  # the natural forward: the FE itself, BatchNorm in training mode
    logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, b['image'], branch='adv',
                            train=True, mutable=['batch_stats'])
    return losses.cross_entropy(logits, b['label'])

  grads = flat(jax.grad(natural_ce)(state.params))
  old, new = flat(state.params), flat(new_state.params)
  np.testing.assert_allclose(float(metrics['loss']), float(natural_ce(state.params)), rtol=1e-5)
  for k in old:
    np.testing.assert_allclose(new[k], old[k] - lr * grads[k], rtol=1e-5, atol=1e-6, err_msg=k)
  fe = [k for k in old if models.param_group(k.split('/')) == 'fe']
  assert fe and all(np.abs(grads[k]).max() > 0 for k in fe)  # every FE conv and BN parameter
  assert max(np.abs(new[k] - old[k]).max() for k in fe if k.endswith('kernel')) > 1e-4


def test_pgd_at_loss_is_the_adversarial_cross_entropy():
  """pgd_at's loss and update are those of CE(adversarial branch on x_adv), whatever l1 and l2 hold."""
  model = experiment.create_model(tiny_config('pgd_at'), CLASSES)
  lr, eps = 0.1, 8 / 255
  state = make_state(model, lr, l1=0.7, l2=5.0)  # ignored by pgd_at
  b = batch(seed=3)
  rng = jax.random.PRNGKey(2)
  # A zero step size keeps x_adv = the random start: it does not hang on the sign of round-off-sized
  # gradients, so the comparison can be tight (the attack itself is tested with the attacks).
  step = jax.jit(steps.make_train_step(model, method='pgd_at', eps=eps, step_size=0.0, steps=1,
                                       axis_name=None))
  new_state, metrics = step(state, b, rng)

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  x_adv = attacks.pgd(lambda z: model.apply(variables, z, train=False), b['image'], b['label'], eps=eps,
                      step_size=0.0, steps=1, key=steps.example_keys(rng, b['index']))
  assert float(jnp.abs(x_adv - b['image']).max()) > eps / 2  # a real perturbation

  def adversarial_ce(params):
    logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, x_adv, branch='adv',
                            train=True, mutable=['batch_stats'])
    return losses.cross_entropy(logits, b['label'])

  np.testing.assert_allclose(float(metrics['loss']), float(adversarial_ce(state.params)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['ce_adv']), rtol=0)
  grads = flat(jax.grad(adversarial_ce)(state.params))
  old, new = flat(state.params), flat(new_state.params)
  for k in old:
    np.testing.assert_allclose(new[k], old[k] - lr * grads[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert 'nat_acc' not in metrics  # no natural forward at all


def test_pgd_at_policy_has_zero_scalars_and_the_fixed_schedule():
  config = tiny_config('pgd_at', l1=0.4, l2=3.0, lr=0.05, lr_schedule='constant', epochs=3)
  policy = experiment.create_policy(config)
  state, plan = policy.init()
  assert (plan.lr, plan.l1, plan.l2) == (0.05, 0.0, 0.0)


@pytest.mark.parametrize('schedule,expected', [
    ('constant', [0.01] * 6),
    ('piecewise', [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]),
    ('cosine', [0.01 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]),
])
def test_fixed_policy_learning_rates_best_and_stop(schedule, expected):
  config = tiny_config('vanilla_rft', lr=0.01, lr_schedule=schedule, boundaries=(2, 4), decay=0.1, epochs=6,
                       l1=0.25, l2=2.0)
  config_checks.validate(config)
  policy = experiment.create_policy(config)
  assert not policy.needs_train_accuracy
  state, plan = policy.init({'clean_nat': 0.9})
  used, plans = [plan.lr], []
  robust = [0.30, 0.35, 0.32, 0.35, 0.40, 0.20]
  for epoch, r in enumerate(robust, start=1):
    state, plan = policy.update(state, epoch, {'pgd': r, 'clean_nat': 0.5 + epoch / 100})
    state = policy_lib.from_dict(json.loads(json.dumps(policy_lib.to_dict(state))))  # resumable
    plans.append(plan)
    used.append(plan.lr)
  np.testing.assert_allclose(used[:6], expected, rtol=1e-6)
  assert [p.new_best for p in plans] == [True, True, False, False, True, False]  # ties are not new bests
  assert [p.best_epoch for p in plans] == [1, 2, 2, 2, 5, 5]
  assert not any(p.reload_best for p in plans)  # fixed schedules never reload
  assert [p.stop for p in plans] == [False] * 5 + [True]
  assert all((p.l1, p.l2) == (0.25, 2.0) for p in plans)
  assert state.best_nat_acc == pytest.approx(0.55)  # the best epoch's (5) validation accuracy


@pytest.mark.parametrize('key,value', [('lr_schedule', 'linear'), ('boundaries', (4, 2)),
                                       ('boundaries', (70,)), ('epochs', 0), ('l1', 1.5), ('l2', -1.0),
                                       ('decay', 0.0), ('lr', 0.0)])
def test_bad_fixed_settings_are_config_errors(key, value):
  config = tiny_config('vanilla_rft')
  config.fixed[key] = value
  with pytest.raises(ConfigError, match=f'config.fixed.{key}'):
    config_checks.validate(config)


def test_vanilla_rft_runs_through_the_loop(tmp_path):
  """The same loop, checkpoints and outputs: lr from the fixed schedule, fixed scalars, the best (by
  validation PGD-10) kept and tested, results.json naming the method."""
  from autolora_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.method = 'vanilla_rft'
  config.dataset.name = 'digits'
  config.dataset.classes = (0, 1, 2)
  config.dataset.test_fraction, config.dataset.val_fraction = 0.25, 0.1
  config.model.update(width=8, input_size=8, stem='cifar', conv_impl='native')
  config.attack.train_steps, config.attack.eval_steps = 1, 2
  config.fixed.update(lr=0.02, l1=0.5, l2=1.0, lr_schedule='piecewise', boundaries=(1,), decay=0.5, epochs=2)
  config.batch_size, config.eval_batch_size = 64, 128
  config.progress, config.tensorboard = False, False
  config.autoattack.enabled = False  # AutoAttack has its own tests (test_autoattack, test_evaluation)
  results = train.train_and_evaluate(config, str(tmp_path))

  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['method'] == 'vanilla_rft'
  assert results['method'] == 'vanilla_rft' and results['reference_compat'] is False
  assert set(results) >= {'best', 'final'} and results['final']['epoch'] == 2
  for entry in (results['best'], results['final']):
    assert 0 <= entry['test']['pgd10'] <= entry['test']['clean'] <= 1
    assert entry['test']['clean_nat_branch'] == entry['test']['clean']  # no LoRa: one branch
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['epoch'] for r in records] == [0, 1, 2]
  assert [r['lr'] for r in records[1:]] == [0.02, 0.01]
  assert all((r['l1'], r['l2']) == (0.5, 1.0) for r in records)
  assert not any(r['reload_best'] for r in records[1:]) and records[-1]['stop']
  best = max(records[1:], key=lambda r: (r['val_pgd10'], -r['epoch']))
  assert results['best']['epoch'] == best['epoch'] == records[-1]['best_epoch']
  ckpts = checkpoints.Checkpoints(str(tmp_path))
  try:
    meta = ckpts.restore_meta('latest')
    assert meta['done'] and meta['policy']['l1'] == 0.5
    # The fixed policy never moves the automatic learning rate's window; it keeps the validation curve.
    assert meta['policy']['window_index'] == 1 and not meta['policy']['halved_at_window']
    assert meta['policy']['history'] == [r['val_pgd10'] for r in records[1:]]
    assert meta['normalization'] == {'mean': list(config.model.mean), 'std': list(config.model.std)}
  finally:
    ckpts.close()
