"""ViTs: conversion parity with PyTorch reference ViTs written with timm's key names (tests/torch_vit.py), the
layouts and wrappers read, the dense LoRa branch (its formula, placement, init), the configs and the errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import config_checks, convert, experiment, models, pretrain
from autolora_jax.configs import default
from autolora_jax.errors import CheckpointError, ConfigError
from tests import helpers, tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def _torch():
  return pytest.importorskip('torch')


def _tv():
  _torch()
  from tests import torch_vit  # pylint: disable=g-import-not-at-top (needs torch)
  return torch_vit


def torch_logits(model, x):
  torch = _torch()
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def save(model, path, prefix='', under=None):
  torch = _torch()
  sd = {prefix + k: v for k, v in model.state_dict().items()}
  torch.save(sd if under is None else {under: sd}, path)
  return path


def check_logits(ref, model, variables, size, seed=0):
  """Adversarial-branch logits equal the reference's; the natural branch equals the adversarial one
  exactly (B = 0: the low-rank path adds exact zeros)."""
  x = np.random.RandomState(seed).rand(2, size, size, 3).astype(np.float32)
  adv, nat = jax.device_get(jax.jit(lambda v, x: (model.apply(v, x, branch='adv'), model.apply(v, x, branch='nat')))(
      variables, x))
  expected = torch_logits(ref, x)
  assert np.abs(expected).max() > 0.5  # non-trivial logits
  np.testing.assert_allclose(adv, expected, rtol=0, atol=TOL)
  np.testing.assert_array_equal(nat, adv)


# -- conversion parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ['vit_s16', 'vit_s16_convstem'])
def test_converted_vit_s16_matches_reference_at_224_and_at_another_size(tmp_path, arch):
  """RobustBench's wrapper (normalize.mean/std, model.*): the normaliser is read and applied inside the
  model; at 96x96 the position embedding is resampled as timm resamples it (bicubic, antialiased)."""
  tv = _tv()
  convstem = arch.endswith('convstem')
  ref = tv.robustbench_wrapped(tv.vit(convstem=convstem, seed=1), models.IMAGENET_MEAN, models.IMAGENET_STD)
  path = save(ref, str(tmp_path / f'{arch}.pt'))
  variables, meta = convert.convert_file(path, arch)
  assert meta['layout'] == 'prefixed' and meta['normalization'] == 'checkpoint' and meta['unused_keys'] == []
  assert (meta['dim'], meta['depth'], meta['heads'], meta['input_size']) == (384, 12, 6, 224)
  assert variables['batch_stats'] == {}
  for size in (224, 96):
    model = convert.build_model(meta, lora_rank=8, input_size=size, conv_impl='native')
    full = convert.add_lora(model, variables, seed=0)
    grid = size // 16
    assert full['params']['pos_embed'].shape == (1, 1 + grid * grid, 384)
    check_logits(ref, model, full, size)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['vit_b16', 'vit_b16_convstem'])
def test_converted_vit_b16_matches_reference(tmp_path, arch):
  """ViT-B/16 (12 heads of 64) and its ConvStem (48-96-192-384, then 1x1 to 768), DataParallel's
  'module.' prefix under 'state_dict', at 224 and 160."""
  tv = _tv()
  ref = tv.vit(768, 12, 12, num_classes=10, convstem=arch.endswith('convstem'), seed=2)
  path = save(ref, str(tmp_path / f'{arch}.pth'), prefix='module.', under='state_dict')
  for size in (224, 160):
    model, variables = convert.from_torch(path, arch, input_size=size, conv_impl='native', normalization='none')
    assert (model.dim, model.heads, model.num_classes) == (768, 12, 10)
    check_logits(ref, model, variables, size, seed=size)


def test_conversion_maps_timm_keys_to_flax_paths(tmp_path):
  tv = _tv()
  ref = tv.vit(convstem=True, seed=3)
  got, meta = convert.convert_file(save(ref, str(tmp_path / 'v.pt')), 'vit_s16_convstem')
  assert meta['normalization'] == 'imagenet'  # no normaliser in the file: the ImageNet statistics
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  p = got['params']
  np.testing.assert_array_equal(p['blocks_3']['attn']['qkv']['kernel'], sd['blocks.3.attn.qkv.weight'].T)
  np.testing.assert_array_equal(p['blocks_11']['mlp']['fc2']['bias'], sd['blocks.11.mlp.fc2.bias'])
  np.testing.assert_array_equal(p['blocks_0']['norm1']['scale'], sd['blocks.0.norm1.weight'])
  np.testing.assert_array_equal(p['patch_embed']['proj']['stem_6']['kernel'],
                                sd['patch_embed.proj.stem.6.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p['patch_embed']['proj']['stem_10']['scale'], sd['patch_embed.proj.stem.10.weight'])
  np.testing.assert_array_equal(p['pos_embed'], sd['pos_embed'])
  np.testing.assert_array_equal(p['head']['kernel'], sd['head.weight'].T)


def test_resampled_position_embedding_equals_torch_interpolation():
  torch = _torch()
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  pos = np.random.RandomState(0).randn(1, 1 + 14 * 14, 8).astype(np.float32)
  for grid in (6, 20, 14):
    got = models.resample_pos_embed(pos, grid)
    t = torch.from_numpy(pos[:, 1:].reshape(1, 14, 14, 8)).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(grid, grid), mode='bicubic', antialias=True, align_corners=False)
    expected = np.concatenate([pos[:, :1], t.permute(0, 2, 3, 1).reshape(1, grid * grid, 8).numpy()], 1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  assert models.resample_pos_embed(pos, 14) is pos


# -- the clear errors ---------------------------------------------------------------------------------------

def test_checkpoint_of_another_size_patch_or_stem_is_refused_with_the_arch_to_use(tmp_path):
  tv = _tv()
  torch = _torch()
  small = save(tv.vit(seed=4), str(tmp_path / 's.pt'))
  with pytest.raises(CheckpointError, match=r'holds vit_s16 .*not a vit_b16.*--arch=vit_s16'):
    convert.convert_file(small, 'vit_b16')
  with pytest.raises(CheckpointError, match=r'holds vit_s16 .*patch 16.*not a vit_s16_convstem.*ConvStem'):
    convert.convert_file(small, 'vit_s16_convstem')
  stem = save(tv.vit(convstem=True, seed=4), str(tmp_path / 'c.pt'))
  with pytest.raises(CheckpointError, match=r'holds vit_s16_convstem.*--arch=vit_s16_convstem'):
    convert.convert_file(stem, 'vit_s16')
  patch8 = tv.vit(seed=4)
  patch8.patch_embed.proj = torch.nn.Conv2d(3, 384, 8, 8)
  path8 = save(patch8, str(tmp_path / 'p8.pt'))
  with pytest.raises(CheckpointError, match=r'8x8 patches.*patch 8\), not a vit_s16 .*patch 16\)'):
    convert.convert_file(path8, 'vit_s16')
  with pytest.raises(CheckpointError, match=r'holds a ViT \(vit_s16\), not a resnet18: convert it with --arch=vit_s16'):
    convert.convert_file(small, 'resnet18')


def test_resnet_checkpoint_for_a_vit_arch_is_refused(tmp_path):
  _torch()
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'r.pth')
  tr.save_plain(tr.resnet18(width=8), path)
  with pytest.raises(CheckpointError, match=r'holds no ViT.*--arch=vit_s16.*looks like resnet18'):
    convert.convert_file(path, 'vit_s16')


def test_unknown_lora_target_is_an_error_in_the_config_and_the_model():
  config = default.get_config()
  config.model.arch = 'vit_b16'
  config_checks.validate(config)
  config.model.lora_targets = ('q', 'query')
  with pytest.raises(ConfigError, match=r"lora_targets=\('q', 'query'\) has an unknown LoRa target.*'fc2'"):
    config_checks.validate(config)
  with pytest.raises(ValueError, match=r"Unknown LoRa target\(s\) \['query'\]"):
    helpers.init(helpers.tiny_vit(lora_targets=('q', 'query')))


@pytest.mark.parametrize('key,value,message', [
    ('model.stem', 'cifar', r"ResNet stem; config.model.arch=vit_b16 takes 'imagenet'.*'convstem'"),
    ('model.input_size', 200, r'not a multiple of .*16x16 patches: use e.g. --config.model.input_size=208'),
    ('model.lora_init', 'xavier', r"lora_init='xavier' is not supported: choose one of \('normal', 'kaiming_uniform'\)"),
    ('model.vit.heads', 5, r'width 768 .* not a multiple of its 5 heads'),
    ('reference_compat', True, r'reproduces the authors\' public ResNet code.*--config.reference_compat=False'),
    ('method', 'twins', r'TWINS \(config.method=twins\) needs a network with BatchNorms.*has none'),
    ('model.lora_placement', 'last_block', r"places LoRa in ResNet blocks; a ViT places it by config.model.lora_targets"),
])
def test_vit_config_errors(key, value, message):
  config = default.get_config()
  config.model.arch = 'vit_b16'
  helpers_set(config, key, value)
  with pytest.raises(ConfigError, match=message):
    config_checks.validate(config)


def helpers_set(config, key, value):
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


# -- the dense LoRa branch ---------------------------------------------------------------------------------

def test_dense_delta_equals_the_formula_computed_independently():
  """Branch 'nat' minus branch 'adv' of one LoRaDense is x dW with dW = (B @ A)^T * alpha / r (numpy, float64),
  per slice of the fused qkv; a slice without LoRa is unchanged exactly."""
  layer = models.LoRaDense(12, ('q', 'k', 'v'), lora=('q', 'v'), rank=2, alpha=3.0)
  x = np.random.RandomState(0).randn(3, 5, 6).astype(np.float32)
  variables = layer.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  rng = np.random.RandomState(1)
  for s in ('q', 'v'):
    params[s]['lora_B'] = rng.randn(*params[s]['lora_B'].shape).astype(np.float32)
  nat = np.asarray(layer.apply({'params': params}, x, branch='nat'), np.float64)
  adv = np.asarray(layer.apply({'params': params}, x, branch='adv'), np.float64)
  for i, s in enumerate(('q', 'k', 'v')):
    diff = nat[..., 4 * i:4 * (i + 1)] - adv[..., 4 * i:4 * (i + 1)]
    if s == 'k':
      assert not np.any(diff)
      continue
    a, b = params[s]['lora_A'].astype(np.float64), params[s]['lora_B'].astype(np.float64)
    delta = (b @ a).T * 3.0 / 2  # (in, out) = (B A)^T alpha / r
    np.testing.assert_allclose(diff, x.astype(np.float64) @ delta, rtol=0, atol=1e-5)
    np.testing.assert_allclose(models.dense_lora_delta(a, b, 1.5), delta, rtol=1e-12)
  np.testing.assert_allclose(adv, x.astype(np.float64) @ params['kernel'] + params['bias'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('targets', [models.LORA_TARGETS, ('q', 'v'), ('fc1',)])
def test_placement_follows_lora_targets(targets):
  params = helpers.init(helpers.tiny_vit(lora_rank=4, lora_targets=targets))['params']
  placed = set()
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    names = [p.key for p in path]
    if names[-1] == 'lora_A':
      assert names[0].startswith('blocks_')
      placed.add((names[0], names[-2]))
  expected = {(f'blocks_{i}', t) for i in range(2) for t in targets}
  assert placed == expected
  dims = {'q': (32, 32), 'k': (32, 32), 'v': (32, 32), 'proj': (32, 32), 'fc1': (32, 128), 'fc2': (128, 32)}
  assert models.lora_params_count(params) == 2 * sum(4 * (dims[t][0] + dims[t][1]) for t in targets)


def test_lora_initialisations():
  normal = helpers.init(helpers.tiny_vit(lora_rank=4))['params']['blocks_0']['mlp']['fc1']
  kaiming = helpers.init(helpers.tiny_vit(lora_rank=4, lora_init='kaiming_uniform'))['params']['blocks_0']['mlp']['fc1']
  assert normal['lora_A'].shape == (4, 32) and normal['lora_B'].shape == (128, 4)
  assert not np.any(normal['lora_B']) and not np.any(kaiming['lora_B'])
  assert 0.7 < float(np.std(normal['lora_A'])) < 1.3
  bound = 1 / np.sqrt(32)
  assert float(np.abs(kaiming['lora_A']).max()) <= bound and float(np.abs(kaiming['lora_A']).max()) > 0.8 * bound


def test_branches_differ_once_b_moves_and_the_vit_has_no_batch_stats():
  model = helpers.tiny_vit()
  variables = helpers.with_nonzero_lora_b(helpers.init(model))
  x = helpers.random_batch(n=4)['image']
  nat = model.apply(variables, x, branch='nat')
  adv = model.apply(variables, x, branch='adv')
  assert float(jnp.abs(nat - adv).max()) > 1e-3
  _, upd = model.apply(variables, x, branch='nat', train=True, mutable=['batch_stats'])
  assert upd['batch_stats'] == {}
  with pytest.raises(ValueError, match='A ViT has no BatchNorm'):
    model.apply(variables, x, bn='mix')


# -- configs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'cub200', 'dogs', 'dtd', 'caltech256'])
def test_every_dataset_config_builds_a_vit_b16_at_224(name):
  """--config.model.arch=vit_b16 on every data-set config: it validates, builds ViT-B/16 at the config's
  224x224 input, and points config.pretrained at the converted ViT."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'autolora_jax.configs.{name}').get_config()
  config.model.arch = 'vit_b16'
  config_checks.validate(config)
  assert config.model.input_size == 224
  assert config.pretrained == 'pretrained/vit_b16_linf_eps4.0'
  model = experiment.create_model(config, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert shapes['params']['pos_embed'].shape == (1, 197, 768)
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
  assert n == 85_806_346 + 1_327_104  # timm's ViT-B/16 with a 10-way head, and r = 8 on all six targets


def test_transplant_fills_the_vit_and_resamples_its_position_embedding():
  """A pre-trained ViT at 16x16 inputs (4x4 grid) transplanted into a fine-tuning ViT at 32x32 (8x8)."""
  fe = helpers.init(helpers.tiny_vit(num_classes=7, lora_rank=0))
  target = helpers.init(helpers.tiny_vit(num_classes=3, input_size=32), size=32)
  variables, report = pretrain.transplant(jax.device_get(fe), jax.device_get(target))
  p, src = variables['params'], fe['params']
  np.testing.assert_array_equal(p['blocks_1']['attn']['qkv']['kernel'], src['blocks_1']['attn']['qkv']['kernel'])
  np.testing.assert_allclose(p['pos_embed'], models.resample_pos_embed(src['pos_embed'], 8), rtol=0, atol=0)
  np.testing.assert_array_equal(p['head']['kernel'], target['params']['head']['kernel'])  # the new head
  assert report['unused'] == ['params/head/bias', 'params/head/kernel']


# -- end to end --------------------------------------------------------------------------------------------

TINY_VIT = ['--config.model.arch=vit_s16', '--config.model.stem=imagenet', '--config.model.input_size=32',
            '--config.model.vit.dim=32', '--config.model.vit.depth=2', '--config.model.vit.heads=2']


@pytest.mark.slow
def test_tiny_vit_through_one_epoch_of_run_py(tmp_path):
  """run.py on the digits with a 2-block ViT: one epoch of AutoLoRa, the test with AutoAttack, and
  --mode=eval on its workdir gives the same test numbers from the checkpoint."""
  import json  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  env = tiny_runs.env_for(1)
  args = [sys.executable, 'run.py', '--config=tests/tiny_config.py', f'--workdir={workdir}',
          '--config.auto_lr.max_epochs=1', *TINY_VIT]
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    trained = json.load(f)
  assert trained['arch'] == 'vit_s16' and trained['method'] == 'autolora'
  assert trained['best']['epoch'] == trained['final']['epoch'] == 1
  test = trained['best']['test']
  assert 0.0 <= test['autoattack'] <= test['pgd10_autoattack_points'] and 0.0 <= test['pgd10'] <= test['clean']
  proc = subprocess.run(args + ['--mode=eval'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    evaluated = json.load(f)
  for name in ('best', 'final'):
    assert evaluated[name]['test'] == trained[name]['test']


def test_cli_converts_a_vit_that_config_pretrained_loads(tmp_path):
  """python -m autolora_jax.convert --arch=vit_s16_convstem on RobustBench's layout; config.pretrained=DIR
  gives the converted FE and its normaliser, and fills a fine-tuning ViT at 96x96 (position embedding
  resampled); the folder under another stem is a clear error."""
  tv = _tv()
  ref = tv.robustbench_wrapped(tv.vit(convstem=True, seed=5), CIFAR_MEAN, CIFAR_STD)
  src, dst = save(ref, str(tmp_path / 'vit_s_convstem.pt')), str(tmp_path / 'converted')
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, '-m', 'autolora_jax.convert', f'--src={src}', f'--dst={dst}',
                         '--arch=vit_s16_convstem'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert 'vit_s16_convstem, width 384' in done.stdout and 'Fine-tune with --config.pretrained=' in done.stdout
  config = default.get_config()
  config.model.arch, config.model.stem, config.model.input_size, config.pretrained = 'vit_s16', 'convstem', 96, dst
  config_checks.validate(config)
  fe, meta = pretrain.load_pretrained(dst, 'vit_s16', 'convstem', config.model.width)
  on_the_fly, _ = convert.convert_file(src, 'vit_s16_convstem')
  jax.tree_util.tree_map(np.testing.assert_array_equal, fe, on_the_fly)
  mean, std = experiment.resolve_normalization(config.model, meta, dst)
  np.testing.assert_allclose(mean, CIFAR_MEAN, atol=1e-7)
  np.testing.assert_allclose(std, CIFAR_STD, atol=1e-7)
  model = experiment.create_model(config, 5, (mean, std))
  target = pretrain.init_variables(model, 96, seed=0)
  merged, report = pretrain.transplant(fe, target)
  assert report['unused'] == ['params/head/bias', 'params/head/kernel']
  np.testing.assert_array_equal(merged['params']['blocks_7']['mlp']['fc1']['kernel'],
                                fe['params']['blocks_7']['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(merged['params']['pos_embed'], models.resample_pos_embed(fe['params']['pos_embed'], 6))
  np.testing.assert_array_equal(merged['params']['blocks_7']['attn']['qkv']['q']['lora_A'],
                                target['params']['blocks_7']['attn']['qkv']['q']['lora_A'])
  with pytest.raises(CheckpointError, match=r'holds a converted vit_s16_convstem.*--config.model.stem=convstem'):
    pretrain.load_pretrained(dst, 'vit_s16', 'imagenet', config.model.width)


def test_comparison_leaves_twins_out_for_a_vit():
  from autolora_jax import compare  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  assert 'twins' in compare.default_methods(config)
  config.model.arch = 'vit_s16'
  assert compare.default_methods(config) == ('autolora', 'vanilla_rft', 'pgd_at')


def test_bfloat16_vit_stays_close_to_float32_and_keeps_float32_logits():
  """dtype=bfloat16 computes the matmuls in bfloat16 (parameters float32); LayerNorms, softmax, the LoRa path
  and the head stay float32, so the logits are float32 and near the float32 model's."""
  variables = helpers.with_nonzero_lora_b(helpers.init(helpers.tiny_vit()))
  x = helpers.random_batch(n=4)['image']
  for branch in ('adv', 'nat'):
    full = helpers.tiny_vit().apply(variables, x, branch=branch)
    half = helpers.tiny_vit(dtype=jnp.bfloat16).apply(variables, x, branch=branch)
    assert half.dtype == jnp.float32
    assert float(jnp.abs(half - full).max()) < 0.05 * float(jnp.abs(full).max())
