"""Architectures as specs (models.spec): one place per architecture. Code outside models/ asks the spec, a
spec registered anywhere is built, validated and listed like the package's own, and models/ and convert/
depend one way."""

import ast
import importlib
import os
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from autolora_jax import config_checks, convert, models
from autolora_jax.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'autolora_jax')


def _sources(*folders):
  for folder in folders:
    for dirpath, _, names in os.walk(folder):
      for name in sorted(names):
        if name.endswith('.py'):
          yield os.path.join(dirpath, name)


def _imports(path):
  """Every module a source file imports, also inside functions (absolute names)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{a.name}' for a in node.names)


def test_no_module_outside_models_asks_whether_an_architecture_is_a_vit():
  models_dir = os.path.join(PACKAGE, 'models')
  found = []
  for path in _sources(PACKAGE, os.path.join(ROOT, 'benchmarks')):
    rel = os.path.relpath(path, ROOT)
    if path.startswith(models_dir + os.sep):
      continue
    with open(path) as f:
      if 'is_vit' in f.read():
        found.append(rel)
  assert not found, f'{found} test for a ViT by name: ask models.spec(arch) for what you need.'


def test_models_never_import_convert_and_the_mappings_import_no_other_part_of_convert():
  for path in _sources(os.path.join(PACKAGE, 'models')):
    assert not [m for m in _imports(path) if m.startswith('autolora_jax.convert')], path
  for name in ('resnet', 'vit', 'convnext', 'swin', 'common'):
    path = os.path.join(PACKAGE, 'convert', f'{name}.py')
    others = {m for m in _imports(path)
              if m.startswith('autolora_jax.convert') and not m.startswith('autolora_jax.convert.common')}
    assert not others, (path, others)


def test_every_architecture_has_one_spec_and_the_conversions_follow_from_them():
  assert models.arch_names() == ('convnext_t', 'convnext_s', 'convnext_b', 'convnext_l', 'resnet18', 'resnet50',
                                 'swin_t', 'swin_s', 'swin_b', 'swin_l', 'vit_s16', 'vit_b16')
  assert dict(models.ARCHITECTURES) == {s.name: s.builder for s in models.specs()}
  assert [s.name for s in models.specs() if s.has_batchnorm] == ['resnet18', 'resnet50']
  assert models.is_vit('vit_b16') and not models.is_vit('resnet50') and not models.is_vit('unknown')
  convnexts = {f'convnext_{s}{stem}' for s in 'tsbl' for stem in ('', '_convstem')}
  assert set(convert.ARCHS) == {'resnet18', 'resnet50', 'resnet18_cifar', 'resnet50_cifar', 'vit_s16', 'vit_b16',
                                'vit_s16_convstem', 'vit_b16_convstem', 'swin_t', 'swin_s', 'swin_b', 'swin_l',
                                *convnexts}
  assert convert.mapping('convnext_b') is convert.convnext and convert.mapping('swin_t') is convert.swin
  assert convert.ARCHS['vit_b16_convstem'] == ('vit_b16', 'convstem')
  assert convert.mapping('resnet50') is convert.resnet and convert.mapping('vit_s16') is convert.vit
  with pytest.raises(ValueError, match=r"Unknown architecture 'resnet34': choose one of \('convnext_t', "):
    models.spec('resnet34')


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50', 'vit_s16', 'vit_b16', 'convnext_b', 'swin_b'])
def test_the_paper_configs_pretrained_folder_is_the_specs_checkpoint(arch):
  config = default.get_config()
  config.pretrained = default.robust_imagenet_fe(config)
  config.model.arch = arch
  assert config.pretrained == 'pretrained/' + models.spec(arch).pretrained


class Toy(nn.Module):
  """A network of a family the package does not have: mean-pooled pixels -> dense head."""
  num_classes: int
  input_size: int = 8

  @nn.compact
  def __call__(self, x, branch='adv', train=False):
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


@pytest.fixture
def toy_spec():
  received = {}

  def toy(num_classes, **attributes):
    received.update(attributes)
    return Toy(num_classes, input_size=attributes['input_size'])

  spec = models.register(models.ArchSpec(name='toy', label='Toy', builder=toy, has_batchnorm=False,
                                         ignores=('width', 'lora_placement')))
  yield spec, received
  models.unregister('toy')


def test_a_spec_registered_anywhere_is_built_validated_and_listed(toy_spec):
  spec, received = toy_spec
  config = default.get_config()
  config.model.arch = 'toy'
  config.model.input_size = 8
  config.pretrained = ''
  config_checks.validate(config)
  model = models.create_model(config.model, 3)
  assert isinstance(model, Toy) and model.input_size == 8
  assert 'width' not in received and received['lora_rank'] == config.model.lora_rank
  logits = model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))), jnp.ones((2, 8, 8, 3)))
  assert logits.shape == (2, 3)
  assert models.spec('toy') is spec and 'toy' in models.ARCHITECTURES and 'toy' in models.arch_names()
  assert 'toy' not in convert.ARCHS  # no converter: no --arch
  with pytest.raises(convert.CheckpointError, match='no checkpoint conversion for toy'):
    convert.mapping('toy')
  config.method = 'twins'
  with pytest.raises(config_checks.ConfigError, match=r'TWINS \(config.method=twins\) needs a network with BatchNorms.*toy has none.*resnet18'):
    config_checks.validate(config)
  config.method = 'autolora'
  config.model.stem = 'cifar'
  with pytest.raises(config_checks.ConfigError, match=r"config.model.stem='cifar' is not supported: choose one "
                                                      r"of \('imagenet',\)"):
    config_checks.validate(config)
  models.unregister('toy')
  with pytest.raises(config_checks.ConfigError, match="config.model.arch='toy' is not supported"):
    config_checks.validate(config)


def test_a_lora_placement_the_architecture_lacks_is_refused():
  config = default.get_config()
  config.model.arch = 'vit_s16'
  with pytest.raises(ValueError, match=r"lora_placement='last_block' is not one of vit_s16's \('all',\); it "
                                       'places LoRa by lora_targets'):
    models.create_model(config.model, 5, lora_placement='last_block')


def test_convert_vit_is_a_deprecated_name_of_convert_vit():
  sys.modules.pop('autolora_jax.convert_vit', None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    shim = importlib.import_module('autolora_jax.convert_vit')
  assert any(issubclass(w.category, DeprecationWarning) for w in caught)
  assert shim.torch_key is convert.vit.torch_key and shim.ANCHOR == 'cls_token'
