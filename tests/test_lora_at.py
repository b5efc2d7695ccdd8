"""lora_at: adversarial training of the LoRa factors and the head on a frozen FE, against W + dW."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import attacks, checkpoints, config_checks, experiment, methods, models, reporting, steps, train
from autolora_jax.errors import ConfigError
from tests import helpers, tiny_runs


def lora_state(seed=0):
  """A tiny ResNet-18 with LoRa (B random, so that W + dW differs from W) and lora_at's optimizer."""
  model = helpers.tiny_resnet18()
  variables = helpers.with_nonzero_lora_b(helpers.init(model, seed=seed))
  tx = methods.get('lora_at').make_optimizer(0.1, 0.9, 1e-2)  # a large weight decay: it must not reach the FE
  return model, steps.create_train_state(model, variables, tx)


def by_group(tree, params):
  groups = models.param_groups(params)
  out = {'fe': [], 'lora': [], 'head': []}
  for g, leaf in zip(jax.tree_util.tree_leaves(groups), jax.tree_util.tree_leaves(tree)):
    out[g].append(np.asarray(leaf))
  return out


def test_gradients_and_updates_reach_only_lora_and_head():
  model, state = lora_state()
  step = jax.jit(steps.make_train_step(model, method='lora_at', eps=8 / 255, step_size=2 / 255, steps=2,
                                       axis_name=None))
  new, metrics = step(state, helpers.random_batch(8), jax.random.PRNGKey(0))
  assert set(metrics) == {'loss', 'ce_adv', 'adv_acc', 'grad_norm'}
  before, after = by_group(state.params, state.params), by_group(new.params, state.params)
  for a, b in zip(before['fe'], after['fe']):
    np.testing.assert_array_equal(a, b)  # no update, no weight decay: bit for bit
  for name in ('lora', 'head'):
    assert all(not np.array_equal(a, b) for a, b in zip(before[name], after[name])), name
  # The loss's own gradient: exact zeros on every FE parameter.
  ctx = methods.LossContext(model=model, forward=lambda p, s, x, **kw: _forward(model, p, s, x, **kw))
  loss_fn = methods.get('lora_at').make_loss(ctx)
  batch = helpers.random_batch(8)
  grads = jax.grad(lambda p: loss_fn(p, state, batch['image'], batch['image'], batch['label'])[0])(state.params)
  g = by_group(grads, state.params)
  assert all(not np.any(a) for a in g['fe'])
  assert all(np.any(a) for a in g['lora'] + g['head'])


def _forward(model, params, stats, x, **kwargs):
  logits, upd = model.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'],
                            **kwargs)
  return logits, upd['batch_stats']


def test_the_attack_and_the_evaluation_target_the_trained_w_plus_ba_model(monkeypatch):
  model, state = lora_state()
  batch = helpers.random_batch(8)
  seen = []
  pgd = attacks.pgd

  def recording_pgd(logits_fn, x, *args, **kwargs):
    seen.append(np.asarray(logits_fn(x)))
    return pgd(logits_fn, x, *args, **kwargs)

  monkeypatch.setattr(attacks, 'pgd', recording_pgd)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  x = jnp.asarray(batch['image'])
  nat = np.asarray(model.apply(variables, x, branch='nat', train=False))
  adv = np.asarray(model.apply(variables, x, branch='adv', train=False))
  assert not np.allclose(nat, adv)  # B != 0: the two models differ
  steps.make_train_step(model, method='lora_at', eps=8 / 255, step_size=2 / 255, steps=1, axis_name=None)(
      state, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(seen[-1], nat, rtol=1e-5, atol=1e-5)
  counts = steps.make_eval_step(model, eps=8 / 255, step_size=2 / 255, steps=1, axis_name=None,
                                branch=methods.get('lora_at').deployed_branch)(
      state, {**batch, 'mask': np.ones(8, np.float32)})
  np.testing.assert_allclose(seen[-1], nat, rtol=1e-5, atol=1e-5)
  assert int(counts['clean_adv']) == int(np.sum(nat.argmax(-1) == batch['label']))


def test_config_section_checks_and_resolution():
  config = tiny_runs.tiny_config(method='lora_at')
  config_checks.validate(config)
  assert experiment.model_overrides(config) == {} and experiment.weight_decay(config) == 1e-4
  config.model.lora_rank = 0
  with pytest.raises(ConfigError, match='lora_rank must be a positive integer for lora_at'):
    config_checks.validate(config)
  config = tiny_runs.tiny_config(method='lora_at', **{'lora_at.boundaries': (70,)})
  with pytest.raises(ConfigError, match='config.lora_at.boundaries'):
    config_checks.validate(config)


def tiny_lora_at(**overrides):
  config = tiny_runs.tiny_config(epochs=2, method='lora_at', **overrides)
  config.lora_at.epochs = 2
  config.lora_at.boundaries = (1,)
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 16
  config.autoattack.batch_size = 16
  return config


def _latest_state(workdir):
  ckpts = checkpoints.Checkpoints(workdir)
  step = ckpts.latest_step()
  ckpts.close()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', 'latest', str(step), 'state'))


@pytest.mark.slow
def test_a_run_through_train_and_evaluate_resumes_to_the_same_result(tmp_path, monkeypatch):
  straight = str(tmp_path / 'straight')
  results = train.train_and_evaluate(tiny_lora_at(), straight)
  assert results['method'] == 'lora_at'
  with open(os.path.join(straight, 'results.json')) as f:
    on_disk = json.load(f)
  assert on_disk['final']['epoch'] == 2 and 0.0 <= on_disk['final']['test']['pgd10'] <= 1.0
  # The deployed model is W + dW: its clean accuracy is the natural branch's.
  assert on_disk['final']['test']['clean'] == on_disk['final']['test']['clean_nat_branch']
  records = reporting.MetricsLog(straight).read()
  assert [r['epoch'] for r in records] == [0, 1, 2] and [r['lr'] for r in records[1:]] == pytest.approx([0.01, 0.001])

  resumed = str(tmp_path / 'resumed')
  resumed_results = tiny_runs.stopped_then_resumed(tiny_lora_at, resumed, monkeypatch, epoch=1)
  assert tiny_runs.read_metrics(resumed) == tiny_runs.read_metrics(straight)
  for name in ('best', 'final'):
    assert resumed_results[name] == results[name]
  # The FE of the final state is the initial one (this config has no pre-training: the seeded init).
  final = _latest_state(straight)['params']
  exp = experiment.Experiment(tiny_lora_at(), str(tmp_path / 'probe'), load_fe=False)
  init = exp.template().params
  exp.close()
  got, want = by_group(final, init), by_group(init, init)
  for a, b in zip(got['fe'], want['fe']):
    np.testing.assert_array_equal(a, b)
