"""ConvNeXts and Swins: conversion parity with PyTorch reference models written with timm's key names
(tests/torch_convnext.py, tests/torch_swin.py), the layouts and wrappers read, the LoRa placement, the
configs, the export and the clear errors. Routing: tests/test_steps.py; four devices: tests/test_pmap.py."""

import functools
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import config_checks, convert, experiment, models
from autolora_jax.configs import default
from autolora_jax.errors import CheckpointError, ConfigError
from tests import helpers, tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _torch():
  return pytest.importorskip('torch')


def _refs():
  _torch()
  from tests import torch_convnext, torch_swin, torch_vit  # pylint: disable=g-import-not-at-top (needs torch)
  return torch_convnext, torch_swin, torch_vit


def save(model, path, prefix='', under=None):
  torch = _torch()
  sd = {prefix + k: v for k, v in model.state_dict().items()}
  torch.save(sd if under is None else {under: sd}, path)
  return path


def check_logits(ref, model, variables, size=224, seed=0):
  """Adversarial-branch logits equal the reference's; the natural branch equals the adversarial one exactly
  right after conversion (B = 0)."""
  torch = _torch()
  x = np.random.RandomState(seed).rand(2, size, size, 3).astype(np.float32)
  adv, nat = jax.device_get(jax.jit(lambda v, x: (model.apply(v, x, branch='adv'), model.apply(v, x, branch='nat')))(
      variables, x))
  with torch.no_grad():
    expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.abs(expected).max() > 0.5
  np.testing.assert_allclose(adv, expected, rtol=0, atol=TOL)
  np.testing.assert_array_equal(nat, adv)


# -- conversion parity at 224x224 -----------------------------------------------------------------------------

CONVNEXT_STEMS = {'convnext_t': None, 'convnext_s': None, 'convnext_b': None, 'convnext_l': None,
                  'convnext_t_convstem': 'two', 'convnext_s_convstem': 'two', 'convnext_b_convstem': 'three',
                  'convnext_l_convstem': 'three'}


def _convnext_parity(tmp_path, arch, wrapper):
  tc, _, tv = _refs()
  model_arch = arch.replace('_convstem', '')
  depths, dims, _ = models.convnext.CONVNEXT_SIZES[model_arch]
  ref = tc.convnext(depths, dims, convstem=CONVNEXT_STEMS[arch], seed=1)
  if wrapper == 'robustbench':  # RobustBench's and Singh et al.'s nn.Sequential(normalize, model)
    ref = tv.robustbench_wrapped(ref, models.IMAGENET_MEAN, models.IMAGENET_STD)
    path = save(ref, str(tmp_path / f'{arch}.pt'))
  else:  # ARES's and DataParallel's 'module.' prefix under 'state_dict'
    path = save(ref, str(tmp_path / f'{arch}.pth'), prefix='module.', under='state_dict')
  model, variables = convert.from_torch(path, arch, conv_impl='native',
                                        normalization='auto' if wrapper == 'robustbench' else 'none')
  assert (tuple(model.depths), tuple(model.dims), model.stem) == (depths, dims, 'convstem' if 'convstem' in arch
                                                                   else 'imagenet')
  check_logits(ref, model, variables)


@pytest.mark.parametrize('arch,wrapper', [('convnext_t', 'robustbench'), ('convnext_t_convstem', 'module')])
def test_converted_convnext_t_matches_reference(tmp_path, arch, wrapper):
  _convnext_parity(tmp_path, arch, wrapper)


@pytest.mark.parametrize('arch', ['convnext_s', 'convnext_s_convstem', pytest.param('convnext_b', marks=pytest.mark.slow),
                                  pytest.param('convnext_b_convstem', marks=pytest.mark.slow)])
def test_converted_convnext_s_and_b_match_reference(tmp_path, arch):
  _convnext_parity(tmp_path, arch, 'robustbench')


def _swin_parity(tmp_path, arch, wrapper):
  _, ts, tv = _refs()
  depths, dim, heads = models.swin.SWIN_SIZES[arch]
  ref = ts.swin(depths, dim, heads, seed=2)
  if wrapper == 'robustbench':
    ref = tv.robustbench_wrapped(ref, models.IMAGENET_MEAN, models.IMAGENET_STD)
    path = save(ref, str(tmp_path / f'{arch}.pt'))
  else:
    path = save(ref, str(tmp_path / f'{arch}.pth'), prefix='module.', under='state_dict')
  variables, meta = convert.convert_file(path, arch, normalization='auto' if wrapper == 'robustbench' else 'none')
  assert meta['unused_keys'] == [] and (meta['dim'], meta['heads'], meta['window']) == (dim, heads, 7)
  model = convert.build_model(meta, lora_rank=8, conv_impl='native')
  check_logits(ref, model, convert.add_lora(model, variables))


def test_converted_swin_t_matches_reference(tmp_path):
  _swin_parity(tmp_path, 'swin_t', 'robustbench')


@pytest.mark.parametrize('arch', ['swin_s', pytest.param('swin_b', marks=pytest.mark.slow)])
def test_converted_swin_s_and_b_match_reference(tmp_path, arch):
  _swin_parity(tmp_path, arch, 'module')


# -- layouts ------------------------------------------------------------------------------------------------

def _state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_original_convnext_code_and_older_timm_swin_layouts_convert_to_the_same_weights():
  """facebookresearch/ConvNeXt's keys (downsample_layers, dwconv, pwconv1/2, norm, head) and the older timm
  Swin layout (patch merging at the end of layers 0-2, head.weight, the buffers) give the same variables."""
  tc, ts, _ = _refs()
  sd = _state(tc.convnext(seed=3))
  original = {}
  for k, v in sd.items():
    k = k.replace('stem.', 'downsample_layers.0.', 1) if k.startswith('stem.') else k
    for i in (1, 2, 3):
      k = k.replace(f'stages.{i}.downsample.', f'downsample_layers.{i}.')
    k = k.replace('.blocks.', '.').replace('.conv_dw.', '.dwconv.').replace('.mlp.fc1.', '.pwconv1.')
    k = k.replace('.mlp.fc2.', '.pwconv2.').replace('head.norm.', 'norm.').replace('head.fc.', 'head.')
    original[k] = v
  assert 'stages.2.4.pwconv1.weight' in original and 'downsample_layers.3.1.weight' in original
  a, _ = convert.convert_state_dict(sd, 'convnext_t')
  b, _ = convert.convert_state_dict(original, 'convnext_t')
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  assert convert.identify(original) is convert.convnext

  sd = _state(ts.swin(seed=3))
  older = {}
  for k, v in sd.items():
    for i in (1, 2, 3):
      k = k.replace(f'layers.{i}.downsample.', f'layers.{i - 1}.downsample.')
    older[k.replace('head.fc.', 'head.')] = v
  older['layers.0.blocks.1.attn_mask'] = np.zeros((64, 49, 49), np.float32)
  older['layers.0.blocks.0.attn.relative_position_index'] = np.zeros((49, 49), np.int64)
  a, _ = convert.convert_state_dict(sd, 'swin_t')
  b, report = convert.convert_state_dict(older, 'swin_t')
  assert report['unused'] == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  p = a['params']
  np.testing.assert_array_equal(p['layers_2']['downsample']['reduction']['kernel'],
                                sd['layers.2.downsample.reduction.weight'].T)
  np.testing.assert_array_equal(p['layers_1']['blocks_0']['attn']['relative_position_bias_table'],
                                sd['layers.1.blocks.0.attn.relative_position_bias_table'])


# -- the clear errors ---------------------------------------------------------------------------------------

def test_a_checkpoint_of_another_size_or_stem_is_refused_with_the_arch_it_fits(tmp_path):
  tc, ts, _ = _refs()
  t = save(tc.convnext(seed=4), str(tmp_path / 't.pt'))
  with pytest.raises(CheckpointError, match=r'holds convnext_t \(depths \(3, 3, 9, 3\).*not a convnext_s .*'
                                            r'--arch=convnext_t\.'):
    convert.convert_file(t, 'convnext_s')
  with pytest.raises(CheckpointError, match=r'holds convnext_t .*patchify stem\), not a convnext_t_convstem.*'
                                            r'--arch=convnext_t\.'):
    convert.convert_file(t, 'convnext_t_convstem')
  stem = save(tc.convnext(convstem='two', seed=4), str(tmp_path / 'c.pt'))
  with pytest.raises(CheckpointError, match=r'holds convnext_t_convstem .*--arch=convnext_t_convstem'):
    convert.convert_file(stem, 'convnext_t')
  with pytest.raises(CheckpointError, match=r'holds a ConvNeXt \(convnext_t\), not a swin_t: convert it with '
                                            r'--arch=convnext_t'):
    convert.convert_file(t, 'swin_t')
  s = save(ts.swin(seed=4), str(tmp_path / 's.pt'))
  with pytest.raises(CheckpointError, match=r'holds swin_t .*not a swin_s .*--arch=swin_t\.'):
    convert.convert_file(s, 'swin_s')
  with pytest.raises(CheckpointError, match=r'holds a Swin \(swin_t\), not a vit_s16: convert it with --arch=swin_t'):
    convert.convert_file(s, 'vit_s16')


@pytest.mark.parametrize('arch,key,value,message', [
    ('swin_b', 'model.input_size', 256, r'input_size=256: A Swin with window 7 takes .*Sizes that work up to 512: '
                                        r'224, 448 \(config.model.swin.window=4 also'),
    ('swin_b', 'model.stem', 'convstem', r"a Swin has one stem, 'imagenet'"),
    ('swin_b', 'model.lora_targets', ('q', 'fc3'), r'unknown LoRa target'),
    ('swin_t', 'model.drop_path', 1.0, r'drop_path=1.0 must be a rate in \[0, 1\)'),
    ('resnet18', 'model.drop_path', 0.1, r'the ResNet \(config.model.arch=resnet18\) has no stochastic depth.*'
                                         r'drop_path=0.0.*\(ConvNeXt, Swin\)'),
    ('convnext_b', 'model.input_size', 200, r'not a multiple of 32.*--config.model.input_size=224'),
    ('convnext_b', 'model.stem', 'cifar', r"not a ConvNeXt stem; .*'convstem'"),
    ('convnext_t', 'model.lora_targets', ('q', 'v'), r"has a name a ConvNeXt lacks: .*\('fc1', 'fc2', 'downsample'\)"),
    ('convnext_t', 'model.convnext.depths', (1, 2), r'four positive integers'),
    ('convnext_t', 'method', 'twins', r'TWINS \(config.method=twins\) needs a network with BatchNorms.*has none'),
])
def test_config_errors(arch, key, value, message):
  config = default.get_config()
  config.model.arch = arch
  config_checks.validate(config)
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    config_checks.validate(config)


def test_a_drop_path_rate_validates_for_both_families():
  for arch in ('convnext_t', 'swin_t'):
    config = default.get_config()
    config.model.arch, config.model.drop_path = arch, 0.1
    config_checks.validate(config)
    assert experiment.create_model(config, 10).drop_path == 0.1


def test_the_models_refuse_what_they_cannot_build():
  with pytest.raises(ValueError, match=r'Sizes that work up to 512: 224, 448'):
    helpers.init(models.spec('swin_b').build(3, input_size=96), size=96)
  with pytest.raises(ValueError, match=r'multiple of 32'):
    helpers.init(helpers.tiny_convnext(input_size=48), size=48)


# -- stochastic depth ----------------------------------------------------------------------------------------

def test_block_rates_rise_as_timms_linspace():
  torch = _torch()
  depths = (3, 3, 9, 3)
  expected = torch.linspace(0, 0.2, sum(depths)).split(depths)
  got = models.stochastic_depth.block_rates(0.2, depths)
  assert [len(r) for r in got] == list(depths)
  np.testing.assert_allclose(np.concatenate(got), np.concatenate([r.numpy() for r in expected]), rtol=0, atol=1e-7)
  assert models.stochastic_depth.block_rates(0.0, (1, 1)) == ((0.0,), (0.0,))


def test_drop_branch_keeps_scaled_or_drops_each_example_by_its_own_key():
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(64))
  y = jnp.ones((64, 2, 2, 3))
  out = np.asarray(models.stochastic_depth.drop_branch(y, keys, 0.25, site=5))
  per_example = out.reshape(64, -1)
  assert np.all(per_example == per_example[:, :1])  # the whole branch of an example, kept or dropped
  kept = per_example[:, 0] != 0
  np.testing.assert_array_equal(per_example[kept, 0], np.float32(1 / 0.75))
  assert 0 < kept.sum() < 64
  # An example's draw depends on its key and the site alone, not on the batch around it.
  alone = np.asarray(models.stochastic_depth.drop_branch(y[7:8], keys[7:8], 0.25, site=5))
  np.testing.assert_array_equal(alone, out[7:8])
  other_site = np.asarray(models.stochastic_depth.drop_branch(y, keys, 0.25, site=6))
  assert not np.array_equal(other_site, out)
  assert models.stochastic_depth.drop_branch(y, None, 0.25, site=5) is y


@pytest.mark.parametrize('family', ['convnext', 'swin'])
def test_drop_path_acts_in_training_mode_only_and_per_example(family):
  """Evaluation mode (PGD, the evaluation, the export) is the model without stochastic depth, exactly; in
  training mode the drops change the logits, and each example's depend on its own key alone (so devices may
  split the batch); a training-mode call without a key per image is refused."""
  make = helpers.tiny_convnext if family == 'convnext' else helpers.tiny_swin
  model, plain = make(drop_path=0.9), make()
  # ConvNeXt layer scales of 0.5 instead of 1e-6: the residual branches, and their drops, count
  variables = jax.tree_util.tree_map_with_path(lambda p, v: v * 5e5 if p[-1].key == 'gamma' else v,
                                               helpers.init(plain))
  x = jnp.asarray(helpers.random_batch(n=4)['image'])
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4))

  def apply(m, x, k, train):
    return np.asarray(jax.jit(functools.partial(m.apply, train=train))(variables, x, drop_keys=k))

  np.testing.assert_array_equal(apply(model, x, None, False), apply(plain, x, None, False))
  np.testing.assert_array_equal(apply(model, x, keys, False), apply(plain, x, None, True))
  dropped = apply(model, x, keys, True)
  assert np.max(np.abs(dropped - apply(plain, x, None, True))) > 1e-4
  one = apply(model, x[2:3], keys[2:3], True)
  np.testing.assert_allclose(one, dropped[2:3], rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match=r'drop_path=0.9 in training mode .* pass drop_keys'):
    model.apply(variables, x, train=True)
  with pytest.raises(ValueError, match=r'drop_keys holds 2 keys for a batch of 4'):
    model.apply(variables, x, train=True, drop_keys=keys[:2])


def test_the_train_steps_forwards_draw_apart():
  """steps.keyed_forward: the loss's first and second forwards get different keys per example, each the
  example's key folded with the forward's position."""
  from autolora_jax import steps  # pylint: disable=g-import-not-at-top
  seen = []
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(jnp.arange(3))
  forward = steps.keyed_forward(lambda params, stats, x, drop_keys, branch: seen.append(drop_keys), keys)
  forward(None, None, None, branch='nat')
  forward(None, None, None, branch='adv')
  for n, got in enumerate(seen):
    np.testing.assert_array_equal(got, jax.vmap(lambda k, n=n: jax.random.fold_in(k, n))(keys))
  assert not np.array_equal(seen[0], seen[1])


# -- LoRa placement -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('family,targets', [('convnext', ('fc1', 'fc2')), ('convnext', ('fc1', 'fc2', 'downsample')),
                                            ('swin', ('q', 'k', 'v', 'proj', 'fc1', 'fc2')), ('swin', ('q', 'v'))])
def test_placement_follows_lora_targets(family, targets):
  make = helpers.tiny_convnext if family == 'convnext' else helpers.tiny_swin
  model = make(lora_rank=2, lora_targets=targets)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  placed = set()
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    names = [p.key for p in path]
    if names[-1] == 'lora_A':
      placed.add(names[-2] if names[-2] != 'downsample_1' else 'downsample')
      assert names[0].startswith('stages_' if family == 'convnext' else 'layers_')
  assert placed == set(targets)
  groups = set(jax.tree_util.tree_leaves(models.param_groups(params)))
  assert groups == {'fe', 'lora', 'head'}
  head = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if models.param_group(p) == 'head']
  assert len(head) == 2  # the classifier alone: a ConvNeXt's head LayerNorm ('head_norm') is a part of the FE


def test_shifted_depthwise_convolution_gives_the_grouped_ones_numbers_and_is_the_cpu_choice():
  from autolora_jax.models import convnext  # pylint: disable=g-import-not-at-top
  assert convnext.depthwise_for('auto', 'cpu') == convnext.depthwise_for('im2col', 'cpu') == 'shifts'
  assert convnext.depthwise_for('native', 'cpu') == convnext.depthwise_for('auto', 'gpu') == 'grouped'
  config = default.get_config()
  config.model.arch = 'convnext_t'
  assert models.create_model(config.model, 5).depthwise == convnext.depthwise_for('auto', jax.default_backend())
  meta = {'model_arch': 'convnext_t', 'stem': 'imagenet', 'mean': None, 'std': None, 'num_classes': 5,
          'input_size': 32, 'dims': [8, 16, 32, 64], 'depths': [1, 1, 1, 1]}
  for impl in ('native', 'auto'):  # a converted checkpoint's model follows the conv_impl asked for
    assert convert.build_model(meta, conv_impl=impl).depthwise == convnext.depthwise_for(impl, jax.default_backend())
  grouped, shifts = helpers.tiny_convnext(), helpers.tiny_convnext(depthwise='shifts')
  variables = helpers.with_nonzero_lora_b(helpers.init(grouped, size=32))
  x = jnp.asarray(helpers.random_batch(n=2, size=32)['image'])

  def outputs(model):
    def loss(params, z):
      return jnp.sum(model.apply({**variables, 'params': params}, z, branch='nat', train=True) ** 2)
    grads = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
    return [model.apply(variables, x, branch=b) for b in ('adv', 'nat')] + jax.tree_util.tree_leaves(grads)

  for a, b in zip(jax.jit(lambda: outputs(grouped))(), jax.jit(lambda: outputs(shifts))()):
    scale = float(jnp.max(jnp.abs(a))) or 1.0
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale


def test_the_default_lora_targets_mean_the_convnext_mlp():
  config = default.get_config()
  config.model.arch = 'convnext_t'
  model = models.create_model(config.model, 10)
  assert tuple(model.lora_targets) == ('fc1', 'fc2')


# -- configs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'cub200', 'dogs', 'dtd', 'caltech256'])
def test_every_dataset_config_builds_convnext_b_convstem_and_swin_b_at_224(name):
  config = importlib.import_module(f'autolora_jax.configs.{name}').get_config()
  for arch, stem in (('convnext_b', 'convstem'), ('swin_b', 'imagenet')):
    config.model.arch, config.model.stem = arch, stem
    config_checks.validate(config)
    assert config.model.input_size == 224 and config.pretrained == f'pretrained/{arch}_linf_eps4.0'
    model = experiment.create_model(config, 10)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    fe = sum(int(np.prod(v.shape)) for p, v in jax.tree_util.tree_leaves_with_path(shapes['params'])
             if models.param_group(p[1:]) == 'fe')
    assert fe > 80_000_000  # B-sized


def test_converted_folder_gives_the_config_model():
  """The converter's meta rebuilds the model: sizes, window and input size."""
  meta = {'model_arch': 'swin_t', 'stem': 'imagenet', 'mean': None, 'std': None, 'num_classes': 4,
          'dim': 96, 'depths': [2, 2, 6, 2], 'heads': 3, 'window': 7, 'input_size': 224}
  model = convert.build_model(meta, conv_impl='native')
  assert (model.dim, tuple(model.depths), model.heads, model.window, model.input_size) == (96, (2, 2, 6, 2), 3, 7, 224)
  meta = {'model_arch': 'convnext_b', 'stem': 'convstem', 'mean': None, 'std': None, 'num_classes': 4,
          'dims': [128, 256, 512, 1024], 'depths': [3, 3, 27, 3], 'input_size': 224}
  model = convert.build_model(meta, conv_impl='native')
  assert tuple(model.dims) == (128, 256, 512, 1024) and model.convstem_layout == 'three'


# -- export -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', ['convnext', pytest.param('convnext_convstem', marks=pytest.mark.slow), 'swin'])
def test_the_exported_torch_model_gives_the_jax_logits(family):
  torch = _torch()
  from autolora_jax import export  # pylint: disable=g-import-not-at-top
  if family == 'swin':
    arch, model = 'swin_t', helpers.tiny_swin(6)
  else:
    arch, model = 'convnext_b', helpers.tiny_convnext(6, stem='convstem' if 'convstem' in family else 'imagenet',
                                                       convstem_layout='three')
  variables = helpers.with_nonzero_lora_b(helpers.init(model, size=32), scale=0.5)
  x = np.random.default_rng(0).random((3, 37, 37, 3), dtype=np.float32)
  expected = np.asarray(model.apply(variables, jnp.asarray(x), branch='adv'))
  module = export.script(export.torch_model(model, variables, arch))
  got = module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).detach().numpy()
  assert float(np.max(np.abs(got - expected)) / np.max(np.abs(expected))) < 1e-4
  keys = set(convert.export_state_dict(variables, convert.arch_for(arch, model.stem)))
  assert not any('lora' in k for k in keys)
  if family == 'swin':
    assert {'patch_embed.proj.weight', 'layers.1.downsample.reduction.weight', 'head.fc.weight',
            'layers.0.blocks.1.attn.relative_position_bias_table'} <= keys
  elif family == 'convnext':
    assert {'stem.0.weight', 'stem.1.bias', 'stages.1.downsample.1.weight', 'stages.3.blocks.0.gamma',
            'head.norm.weight', 'head.fc.bias'} <= keys
  else:
    assert {'stem.stem.0.weight', 'stem.stem.7.bias'} <= keys


# -- end to end ---------------------------------------------------------------------------------------------

TINY = {
    'convnext': ['--config.model.arch=convnext_t', '--config.model.stem=imagenet', '--config.model.input_size=32',
                 '--config.model.convnext.dim=8',
                 '--config.model.convnext.depths=(1,1,1,1)'],
    'swin': ['--config.model.arch=swin_t', '--config.model.stem=imagenet', '--config.model.input_size=32',
             '--config.model.swin.dim=8',
             '--config.model.swin.heads=1', '--config.model.swin.depths=(2,2,1,1)', '--config.model.swin.window=4'],
}


@pytest.mark.slow
@pytest.mark.parametrize('family', ['convnext', 'swin'])
def test_tiny_model_through_one_epoch_of_run_py(tmp_path, family):
  """run.py on the digits: one epoch of AutoLoRa and the test (AutoAttack, model-agnostic, is left to its own
  tests and to the ResNet and ViT runs: its compilation for another model is what this test would add)."""
  workdir = str(tmp_path / 'run')
  args = [sys.executable, 'run.py', '--config=tests/tiny_config.py', f'--workdir={workdir}',
          '--config.auto_lr.max_epochs=1', '--config.autoattack.enabled=False', *TINY[family]]
  proc = subprocess.run(args, cwd=ROOT, env=tiny_runs.env_for(1), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    trained = json.load(f)
  assert trained['best']['epoch'] == trained['final']['epoch'] == 1
  test = trained['best']['test']
  assert 0.0 <= test['pgd10'] <= test['clean'] <= 1.0 and 'autoattack' not in test
