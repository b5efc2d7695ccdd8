"""Importing weights from .safetensors files and from the Hugging Face hub (hf://ORG/REPO/PATH[@REVISION]):
the same arrays and variables as the PyTorch file, the logits, no torch needed, bfloat16/float16 files, the
architecture check, a hub cache written by hand (offline), and the clear errors."""

import json
import os
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')
huggingface_hub = pytest.importorskip('huggingface_hub')

from autolora_jax import config_checks, convert, hub, pretrain  # noqa: E402
from autolora_jax.configs import default  # noqa: E402
from autolora_jax.errors import CheckpointError, ConfigError  # noqa: E402
from tests import helpers  # noqa: E402
from tests import torch_reference as tr  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
COMMIT = 'a' * 40  # the hand-written hub cache's commits
OTHER_COMMIT = 'b' * 40


def robustness_state_dict(model, mean=CIFAR_MEAN, std=CIFAR_STD):
  """The robustness library's keys (tr.save_robustness's layout), as one flat dict of contiguous tensors."""
  sd = {}
  for prefix in ('module.model.', 'module.attacker.model.'):
    sd.update({prefix + k: v.clone().contiguous() for k, v in model.state_dict().items()})
  for prefix in ('module.normalizer.', 'module.attacker.normalizer.'):
    sd[prefix + 'new_mean'] = torch.tensor(mean).view(3, 1, 1)
    sd[prefix + 'new_std'] = torch.tensor(std).view(3, 1, 1)
  return sd


def save_both(sd, folder, name):
  """`sd` as name.pt (torch.save) and name.safetensors; returns both paths."""
  pt, st = os.path.join(folder, name + '.pt'), os.path.join(folder, name + '.safetensors')
  torch.save(sd, pt)
  safetensors_torch.save_file(sd, st)
  return pt, st


def assert_same_arrays(got, expected):
  assert sorted(got) == sorted(expected)
  for key in expected:
    assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def assert_same_variables(got, expected):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)


@pytest.fixture(scope='module')
def cifar_files(tmp_path_factory):
  """A width-8 CIFAR-layout ResNet-18 (10 classes) in the robustness library's layout as .pt and
  .safetensors: (torch model, pt path, safetensors path)."""
  ref = tr.resnet18(num_classes=10, width=8, stem='cifar', seed=11)
  pt, st = save_both(robustness_state_dict(ref), str(tmp_path_factory.mktemp('weights')), 'r18')
  return ref, pt, st


# -- .safetensors ------------------------------------------------------------------------------------------

def test_safetensors_gives_the_arrays_and_variables_of_the_pt_file(cifar_files):
  _, pt, st = cifar_files
  assert_same_arrays(convert.read_state_dict(st), convert.read_state_dict(pt))
  expected, meta_pt = convert.convert_file(pt, 'resnet18_cifar')
  got, meta_st = convert.convert_file(st, 'resnet18_cifar')
  assert_same_variables(got, expected)
  assert meta_st['layout'] == 'robustness' and meta_st['normalization'] == 'checkpoint'
  assert meta_st['source'] == os.path.abspath(st)
  assert {**meta_st, 'source': None} == {**meta_pt, 'source': None}


def test_safetensors_logits_equal_pytorch(cifar_files):
  ref, _, st = cifar_files
  model, variables = convert.from_torch(st, 'resnet18_cifar', conv_impl='native')
  x = np.random.RandomState(0).rand(4, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    expected = tr.Normalized(ref, CIFAR_MEAN, CIFAR_STD).eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  expected = expected.numpy()
  got = np.asarray(model.apply(variables, x, branch='adv', train=False))
  assert np.abs(expected).max() > 0.5
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_safetensors_read_as_float32_like_torch(tmp_path, dtype):
  ref = tr.resnet18(width=8, seed=12)
  sd = {k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
  pt, st = save_both(sd, str(tmp_path), dtype)
  got = convert.read_state_dict(st)
  assert got['conv1.weight'].dtype == np.float32 and got['bn1.num_batches_tracked'].dtype == np.int64
  assert_same_arrays(got, convert.read_state_dict(pt))  # torch's .float(): the same float32 values
  variables, meta = convert.convert_file(st, 'resnet18')
  assert meta['layout'] == 'plain' and variables['params']['conv1']['kernel'].dtype == np.float32


def test_safetensors_are_read_without_torch(cifar_files, tmp_path):
  _, pt, st = cifar_files
  out = str(tmp_path / 'converted.npz')
  code = f'''
import sys
sys.modules['torch'] = None  # `import torch` raises ImportError
import numpy as np
from flax import traverse_util
from autolora_jax import convert
variables, meta = convert.convert_file({st!r}, 'resnet18_cifar')
np.savez({out!r}, **traverse_util.flatten_dict(variables, sep='/'))
assert sys.modules['torch'] is None
try:
  convert.convert_file({pt!r}, 'resnet18_cifar')
except convert.CheckpointError as e:
  assert 'pip install torch' in str(e), e
else:
  raise AssertionError('read a .pt without torch')
print('OK', meta['layout'])
'''
  done = helpers.run_python(code, timeout=300)
  assert done.returncode == 0 and 'OK robustness' in done.stdout, done.stderr[-3000:]
  expected, _ = convert.convert_file(pt, 'resnet18_cifar')
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  with np.load(out) as got:
    flat = traverse_util.flatten_dict(expected, sep='/')
    assert sorted(got.files) == sorted(flat)
    for key, value in flat.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_safetensors_vit_with_robustbench_wrapper(tmp_path):
  from tests import torch_vit as tv  # pylint: disable=g-import-not-at-top (needs torch)
  ref = tv.robustbench_wrapped(tv.vit(seed=13), CIFAR_MEAN, CIFAR_STD)
  sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
  pt, st = save_both(sd, str(tmp_path), 'vit')
  expected, meta_pt = convert.convert_file(pt, 'vit_s16')
  got, meta = convert.convert_file(st, 'vit_s16')
  assert_same_variables(got, expected)
  assert meta['layout'] == 'prefixed' and meta['normalization'] == 'checkpoint' and meta['unused_keys'] == []
  assert (meta['dim'], meta['depth'], meta['heads'], meta['input_size']) == (384, 12, 6, 224)
  np.testing.assert_allclose(meta['mean'], CIFAR_MEAN, atol=1e-7)
  with pytest.raises(CheckpointError, match=r'holds a ViT \(vit_s16\), not a resnet18: .*--arch=vit_s16'):
    convert.convert_file(st, 'resnet18')


def test_safetensors_of_another_architecture_names_its_arch(tmp_path):
  st = str(tmp_path / 'r50.safetensors')
  safetensors_torch.save_file(tr.resnet50(width=8, seed=14).state_dict(), st)
  with pytest.raises(CheckpointError, match=r'does not hold a resnet18.*try --arch=resnet50'):
    convert.convert_file(st, 'resnet18')


def test_damaged_or_foreign_safetensors_file_is_a_checkpoint_error(tmp_path, cifar_files):
  _, pt, st = cifar_files
  cases = {'garbage': b'these are not weights\n', 'empty': b''}
  with open(st, 'rb') as f:
    cases['truncated'] = f.read()[:-100]
  with open(pt, 'rb') as f:
    cases['torch'] = f.read()
  for name, data in cases.items():
    path = tmp_path / f'{name}.safetensors'
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r'is not a readable safetensors file \(safetensors failed') as e:
      convert.convert_file(str(path), 'resnet18_cifar')
    assert '\n' not in str(e.value)
    assert ('name it .pt' in str(e.value)) == (name == 'torch'), name
  safetensors_torch.save_file({}, str(tmp_path / 'none.safetensors'))
  with pytest.raises(CheckpointError, match='without tensors'):
    convert.read_state_dict(str(tmp_path / 'none.safetensors'))
  with pytest.raises(CheckpointError, match='does not exist'):
    convert.convert_file(str(tmp_path / 'absent.safetensors'), 'resnet18')


# -- the Hugging Face hub ------------------------------------------------------------------------------------

def test_hub_paths_parse_and_malformed_ones_are_refused():
  assert hub.parse_hub_path('hf://org/repo/r18.safetensors') == hub.HubPath('org/repo', 'r18.safetensors', None)
  assert hub.parse_hub_path('hf://org/repo/sub/d/r.ckpt@v1.0') == hub.HubPath('org/repo', 'sub/d/r.ckpt', 'v1.0')
  assert hub.parse_hub_path('hf://org/repo/r.pt@refs/pr/3') == hub.HubPath('org/repo', 'r.pt', 'refs/pr/3')
  assert hub.parse_hub_path('hf://org/repo@dev/sub/r.pt') == hub.HubPath('org/repo', 'sub/r.pt', 'dev')
  assert str(hub.parse_hub_path('hf://org/repo@dev/sub/r.pt')) == 'hf://org/repo/sub/r.pt@dev'
  assert hub.is_hub_path('hf://x') and not hub.is_hub_path('/data/hf://x') and not hub.is_hub_path(None)
  for bad in ('hf://org', 'hf://org/repo', 'hf://org/repo/', 'hf:///repo/file', 'hf://org/re po/f',
              'hf://org/repo/a//b', 'hf://org/repo/../f', 'hf://org/repo/f@', 'hf://org/repo@a/f@b'):
    with pytest.raises(CheckpointError, match=r'is not a Hugging Face hub file path .*expected hf://ORG/REPO/PATH '
                                              r'or hf://ORG/REPO/PATH@REVISION'):
      hub.parse_hub_path(bad)
    with pytest.raises(CheckpointError, match='expected hf://ORG/REPO/PATH'):  # before any download or torch
      convert.convert_file(bad, 'resnet18')
  config = default.get_config()
  config.pretrained = 'hf://org/repo/r18.safetensors@main'
  config_checks.validate(config)
  config.pretrained = 'hf://org/repo'
  with pytest.raises(ConfigError, match=r'config.pretrained: .*expected hf://ORG/REPO/PATH'):
    config_checks.validate(config)


def write_hub_cache(cache, local_file, filename='weights/r18.safetensors'):
  """huggingface_hub's cache layout, by hand: models--org--repo/refs/{main,v1} and the snapshots."""
  repo = os.path.join(cache, 'models--org--repo')
  for ref, commit in (('main', COMMIT), ('v1', OTHER_COMMIT)):
    os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
    with open(os.path.join(repo, 'refs', ref), 'w') as f:
      f.write(commit)
    target = os.path.join(repo, 'snapshots', commit, filename)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(local_file, 'rb') as src, open(target, 'wb') as dst:
      dst.write(src.read())
  return repo


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, cifar_files):
  """An offline hub cache in tmp_path holding cifar_files' .safetensors; huggingface_hub reads HF_HUB_CACHE
  and HF_HUB_OFFLINE when imported, so its constants are set too (for this process)."""
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path / 'hub')
  write_hub_cache(cache, cifar_files[2])
  monkeypatch.setenv('HF_HUB_CACHE', cache)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', cache)
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return cache


def test_config_pretrained_hub_path_converts_from_the_offline_cache(offline_hub, cifar_files):
  _, _, st = cifar_files
  expected, _ = convert.convert_file(st, 'resnet18_cifar')
  config = default.get_config()
  config.model.stem, config.model.width, config.model.input_size = 'cifar', 8, 32
  name = 'org/repo/weights/r18.safetensors'
  for path in (f'hf://{name}', f'hf://{name}@{OTHER_COMMIT}', f'hf://{name}@v1',
               'hf://org/repo@v1/weights/r18.safetensors'):
    config.pretrained = path
    config_checks.validate(config)
    variables, meta = pretrain.load_pretrained(config.pretrained, config.model.arch, config.model.stem,
                                               config.model.width)
    assert_same_variables(variables, expected)
    assert meta['source'] == str(hub.parse_hub_path(path)) and meta['layout'] == 'robustness'
  assert hub.resolve('hf://org/repo/weights/r18.safetensors').startswith(
      os.path.join(offline_hub, 'models--org--repo', 'snapshots', COMMIT))


def test_hub_file_missing_from_the_offline_cache_is_one_paragraph(offline_hub):
  for path, command in (('hf://org/repo/weights/r50.safetensors', 'download org/repo weights/r50.safetensors'),
                        ('hf://org/other/r18.safetensors@v2', 'download org/other r18.safetensors --revision v2')):
    with pytest.raises(CheckpointError) as e:
      convert.load_any(path, 'resnet18')
    msg = str(e.value)
    assert '\n' not in msg and 'HF_HUB_OFFLINE is set' in msg and offline_hub in msg, msg
    assert f'`{hub.cli_name()} {command}`' in msg and f'--src={path}' in msg, msg


def test_hub_repository_or_file_that_does_not_exist(monkeypatch):
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  response = types.SimpleNamespace(headers={}, request=None, status_code=404)
  for kind, expected in (('RepositoryNotFoundError', 'repository org/repo of .* does not exist'),
                         ('GatedRepoError', 'is gated'),
                         ('RevisionNotFoundError', "has no revision 'v9'"),
                         ('RemoteEntryNotFoundError', "has no file 'r.safetensors' at revision 'v9'")):
    error = getattr(errors, kind)('not found', response=response)

    def fail(*args, error=error, **kwargs):
      raise error

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fail)
    with pytest.raises(CheckpointError, match=expected) as e:
      hub.resolve('hf://org/repo/r.safetensors@v9')
    assert '\n' not in str(e.value)


def test_hub_path_honours_the_environment_in_a_fresh_process(tmp_path, cifar_files):
  """HF_HUB_CACHE and HF_HUB_OFFLINE as set before huggingface_hub is imported (a run's case)."""
  _, _, st = cifar_files
  cache = str(tmp_path / 'hub')
  write_hub_cache(cache, st)
  code = '''
import json
from autolora_jax import convert
variables, meta = convert.load_any('hf://org/repo/weights/r18.safetensors@v1', 'resnet18_cifar')
print(json.dumps({'source': meta['source'], 'sum': float(sum(abs(v).sum() for v in
      __import__('jax').tree_util.tree_leaves(variables)))}))
'''
  done = helpers.run_python(code, timeout=300, env={'HF_HUB_CACHE': cache, 'HF_HUB_OFFLINE': '1',
                                                     'HF_HOME': str(tmp_path / 'hf_home')})
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  expected, _ = convert.convert_file(st, 'resnet18_cifar')
  assert got['source'] == 'hf://org/repo/weights/r18.safetensors@v1'
  np.testing.assert_allclose(got['sum'], float(sum(np.abs(v).sum() for v in jax.tree_util.tree_leaves(expected))),
                             rtol=1e-6)
