"""The loss, the gradient routing of the AutoLoRa step, and the step itself (unmapped)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import losses, models, steps
from tests import helpers


def test_autolora_loss_matches_numpy():
  rng = np.random.default_rng(0)
  zn, za = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  y = rng.integers(0, 4, 6)

  def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))

  ln, la = log_softmax(zn), log_softmax(za)
  ce_n, ce_a = -ln[np.arange(6), y].mean(), -la[np.arange(6), y].mean()
  kl = (np.exp(ln) * (ln - la)).sum(1).mean()
  loss, parts = losses.autolora_loss(jnp.asarray(zn, jnp.float32), jnp.asarray(za, jnp.float32),
                                     jnp.asarray(y), 0.3, 2.5)
  np.testing.assert_allclose(float(loss), 0.3 * ce_n + 0.7 * ce_a + 2.5 * kl, rtol=1e-5)
  np.testing.assert_allclose(float(parts['kl']), kl, rtol=1e-5)
  kl_fixed = losses.kl_divergence(jnp.asarray(zn), jnp.asarray(za), denominator=10)
  np.testing.assert_allclose(float(kl_fixed), kl * 6 / 10, rtol=1e-5)


def _loss_terms(model, variables, batch, x_adv):
  """The three loss terms as functions of params, routed exactly as the train step routes them."""
  x, y = jnp.asarray(batch['image']), jnp.asarray(batch['label'])
  stats = variables['batch_stats']

  def logits(params):
    nat, upd = model.apply({'params': steps.route_natural(params), 'batch_stats': stats}, x, branch='nat',
                           train=True, mutable=['batch_stats'])
    adv, _ = model.apply({'params': params, 'batch_stats': upd['batch_stats']}, x_adv, branch='adv',
                         train=True, mutable=['batch_stats'])
    return nat, adv

  return {
      'ce_nat': lambda p: losses.cross_entropy(logits(p)[0], y),
      'ce_adv': lambda p: losses.cross_entropy(logits(p)[1], y),
      'kl': lambda p: losses.kl_divergence(*logits(p)),
  }


def _group_norms(grads):
  """Per group ('fe', 'lora', 'head'): the largest absolute gradient entry."""
  out = {'fe': 0.0, 'lora': 0.0, 'head': 0.0}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    group = models.param_group(path)
    out[group] = max(out[group], float(np.max(np.abs(np.asarray(g)))))
  return out


@pytest.mark.parametrize('make_model', [helpers.tiny_resnet18, helpers.tiny_vit, helpers.tiny_convnext,
                                        helpers.tiny_swin], ids=['resnet', 'vit', 'convnext', 'swin'])
def test_gradient_routing_is_exact(make_model):
  """The natural loss reaches no FE parameter (a ViT's: every dense kernel and bias, LayerNorm scale and
  bias, the patch embedding, class token and position embedding), the adversarial one no LoRa parameter."""
  model = make_model()
  variables = helpers.with_nonzero_lora_b(helpers.init(model))
  batch = helpers.random_batch()
  x_adv = jnp.clip(jnp.asarray(batch['image']) + 0.03, 0, 1)
  terms = _loss_terms(model, variables, batch, x_adv)
  params = variables['params']

  g_nat = jax.jit(jax.grad(terms['ce_nat']))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(g_nat):
    if models.param_group(path) == 'fe':  # every FE conv weight and BN scale/bias: exactly zero
      assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)
  norms = _group_norms(g_nat)
  assert norms['lora'] > 0 and norms['head'] > 0

  g_adv = jax.jit(jax.grad(terms['ce_adv']))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(g_adv):
    if models.param_group(path) == 'lora':
      assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)
  norms = _group_norms(g_adv)
  assert norms['fe'] > 0 and norms['head'] > 0

  norms = _group_norms(jax.jit(jax.grad(terms['kl']))(params))  # KL is not stop-gradiented: reaches both
  assert norms['fe'] > 0 and norms['lora'] > 0 and norms['head'] > 0


def test_every_fe_parameter_is_routed():
  params = helpers.init(helpers.tiny_resnet18())['params']
  groups = jax.tree_util.tree_leaves(models.param_groups(params))
  assert set(groups) == {'fe', 'lora', 'head'}
  routed = steps.route_natural(params)
  assert jax.tree_util.tree_structure(routed) == jax.tree_util.tree_structure(params)


@pytest.fixture(scope='module')
def stepped():
  model = helpers.tiny_resnet18()
  variables = helpers.init(model)
  tx = steps.make_optimizer(0.05, 0.9, 1e-4)
  state = steps.create_train_state(model, variables, tx, l1=0.4, l2=2.0)
  train_step = jax.jit(steps.make_train_step(model, eps=8 / 255, step_size=2 / 255, steps=3, axis_name=None))
  batch = helpers.random_batch()
  new_state, metrics = train_step(state, batch, jax.random.PRNGKey(0))
  return model, state, new_state, metrics, train_step, batch


def test_train_step_updates_params_stats_and_reports_metrics(stepped):
  _, state, new_state, metrics, _, _ = stepped
  assert int(new_state.step) == 1
  assert set(metrics) >= {'loss', 'ce_nat', 'ce_adv', 'kl', 'adv_acc', 'nat_acc', 'grad_norm'}
  np.testing.assert_allclose(float(metrics['loss']),
                             0.4 * float(metrics['ce_nat']) + 0.6 * float(metrics['ce_adv'])
                             + 2.0 * float(metrics['kl']), rtol=1e-5)
  before = state.batch_stats['bn1']['mean']
  assert float(jnp.max(jnp.abs(new_state.batch_stats['bn1']['mean'] - before))) > 0
  b_before = state.params['layer1_0']['conv1']['lora_B']
  assert float(jnp.max(jnp.abs(new_state.params['layer1_0']['conv1']['lora_B'] - b_before))) > 0


def test_learning_rate_and_scalars_are_host_settable(stepped):
  _, state, _, _, train_step, batch = stepped
  assert steps.get_learning_rate(state) == pytest.approx(0.05)
  zero_lr = steps.set_learning_rate(state, 0.0)
  moved, _ = train_step(zero_lr, batch, jax.random.PRNGKey(0))
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), moved.params, state.params)
  assert all(jax.tree_util.tree_leaves(same))  # lr 0: SGD moves nothing
  scaled = steps.set_loss_scalars(state, 1.0, 0.0)
  _, metrics = train_step(scaled, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['ce_nat']), rtol=1e-6)


def test_sgd_is_pytorch_coupled_weight_decay_with_momentum():
  tx = steps.sgd(0.1, momentum=0.9, weight_decay=0.01)
  p = {'w': jnp.array([1.0, -2.0])}
  g = {'w': jnp.array([0.5, 0.25])}
  opt = tx.init(p)
  buf = np.zeros(2)
  w = np.array([1.0, -2.0])
  for _ in range(3):  # torch.optim.SGD: d = g + wd * w; buf = m * buf + d; w -= lr * buf
    updates, opt = tx.update(g, opt, p)
    p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    buf = 0.9 * buf + (np.array([0.5, 0.25]) + 0.01 * w)
    w = w - 0.1 * buf
  np.testing.assert_allclose(np.asarray(p['w']), w, rtol=1e-6)


def test_pgd_at_step_loss_is_adversarial_ce():
  model = helpers.tiny_resnet18(lora_rank=0)
  state = steps.create_train_state(model, helpers.init(model), steps.make_optimizer(0.0, 0.9, 0.0))
  step = jax.jit(steps.make_train_step(model, method='pgd_at', eps=8 / 255, step_size=2 / 255, steps=2,
                                       axis_name=None))
  _, metrics = step(state, helpers.random_batch(), jax.random.PRNGKey(3))
  assert float(metrics['loss']) == float(metrics['ce_adv'])
  assert 'ce_nat' not in metrics


def test_eval_step_counts_masked_examples():
  model = helpers.tiny_resnet18()
  state = steps.create_train_state(model, helpers.init(model), steps.make_optimizer(0.0, 0.9, 0.0))
  eval_step = jax.jit(steps.make_eval_step(model, eps=8 / 255, step_size=2 / 255, steps=2, axis_name=None))
  batch = dict(helpers.random_batch(), mask=np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32))
  counts = eval_step(state, batch)
  logits = model.apply(helpers.init(model), batch['image'])
  expected = np.sum((np.argmax(np.asarray(logits), -1) == batch['label'])[:5])
  assert float(counts['count']) == 5 and float(counts['clean_adv']) == expected
  assert float(counts['pgd']) <= float(counts['clean_adv'])


def test_l2_train_step_attacks_inside_the_l2_ball(monkeypatch):
  """config.attack.norm='l2': the train step's adversarial examples (PGD with a random start) lie in the L2
  ball of radius eps and in the box; the eval step's PGD too."""
  seen = []
  inner = steps.attacks.pgd

  def recording(*args, **kwargs):
    out = inner(*args, **kwargs)
    seen.append((kwargs['norm'], kwargs.get('key') is not None, np.asarray(args[1]), np.asarray(out)))
    return out

  monkeypatch.setattr(steps.attacks, 'pgd', recording)
  model = helpers.tiny_resnet18()
  state = steps.create_train_state(model, helpers.init(model), steps.make_optimizer(0.05, 0.9, 0.0))
  batch = helpers.random_batch()
  eps = 0.5
  train_step = steps.make_train_step(model, eps=eps, step_size=0.2, steps=3, axis_name=None, norm='l2')
  eval_step = steps.make_eval_step(model, eps=eps, step_size=0.2, steps=3, axis_name=None, norm='l2')
  with jax.disable_jit():  # eager: the recorded arrays are concrete
    _, metrics = train_step(state, batch, jax.random.PRNGKey(0))
    eval_step(state, dict(batch, mask=np.ones(len(batch['label']), np.float32)))
  assert np.isfinite(float(metrics['loss']))
  assert [(n, k) for n, k, _, _ in seen] == [('l2', True), ('l2', False)]
  for _, _, x, x_adv in seen:
    norms = np.sqrt(np.sum(np.square(x_adv - x).reshape(len(x), -1), axis=1))
    assert np.all(norms <= eps + 1e-5) and np.all(norms > 0)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
