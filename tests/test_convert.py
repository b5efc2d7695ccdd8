"""Checkpoint conversion: parity with PyTorch reference ResNets, the layouts read, the Orbax round trip through
the command line and config.pretrained, and the clear errors."""

import copy
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from autolora_jax import convert, experiment, models, pretrain  # noqa: E402
from autolora_jax.configs import default  # noqa: E402
from autolora_jax.errors import CheckpointError  # noqa: E402
from tests import torch_reference as tr  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
TOL = 1e-4


def torch_logits(model, x, mean, std, train=False):
  """Logits of a (copied) reference model on NHWC images in [0, 1]; in train mode also its new statistics."""
  model = copy.deepcopy(model)
  wrapped = tr.Normalized(model, mean, std) if mean is not None else model
  wrapped.train(train)
  with torch.no_grad():
    out = wrapped(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  return out, model


def stats_of(model, arch):
  """The running statistics of a torch model, converted like the checkpoint."""
  weights, _ = convert.split_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
  variables, _ = convert.convert_state_dict(weights, arch)
  return variables['batch_stats']


def check_parity(torch_model, model, variables, arch, size, mean, std, nat=False):
  """Adversarial-branch logits equal PyTorch's in eval and train mode (and the updated BN statistics)."""
  x = np.random.RandomState(size).rand(4, size, size, 3).astype(np.float32)

  def forward(v, x):
    out = {'eval': model.apply(v, x, branch='adv', train=False)}
    out['train'], out['stats'] = model.apply(v, x, branch='adv', train=True, mutable=['batch_stats'])
    if nat:
      out['nat'] = model.apply(v, x, branch='nat', train=False)
    return out

  out = jax.device_get(jax.jit(forward)(variables, x))
  ref_eval, _ = torch_logits(torch_model, x, mean, std)
  ref_train, trained = torch_logits(torch_model, x, mean, std, train=True)
  assert np.abs(ref_eval).max() > 0.5  # non-trivial logits
  np.testing.assert_allclose(out['eval'], ref_eval, rtol=0, atol=TOL)
  np.testing.assert_allclose(out['train'], ref_train, rtol=0, atol=TOL)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOL),
                         out['stats']['batch_stats'], stats_of(trained, arch))
  if nat:  # LoRa B starts at zero: W + dW = W, so the branches agree (up to the rounding of another graph)
    np.testing.assert_allclose(out['nat'], out['eval'], rtol=0, atol=1e-6)
  return out


@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('ckpts')


def test_resnet18_robustness_checkpoint_parity_224_and_32(ckpt_dir):
  ref = tr.resnet18(seed=1)
  path = str(ckpt_dir / 'resnet18_linf_eps4.0.ckpt')
  tr.save_robustness(ref, path)
  variables, meta = convert.convert_file(path, 'resnet18')
  assert meta['layout'] == 'robustness' and meta['num_classes'] == 1000 and meta['normalization'] == 'checkpoint'
  assert tuple(meta['mean']) == models.IMAGENET_MEAN and meta['unused_keys'] == []
  for size in (224, 32):
    model = convert.build_model(meta, lora_rank=8, input_size=size, conv_impl='native')
    full = convert.add_lora(model, variables, seed=0)
    check_parity(ref, model, full, 'resnet18', size, tr.IMAGENET_MEAN, tr.IMAGENET_STD, nat=size == 32)


@pytest.mark.slow
def test_resnet50_robustness_checkpoint_parity_224_and_32(ckpt_dir):
  ref = tr.resnet50(seed=2)
  path = str(ckpt_dir / 'resnet50_linf_eps4.0.ckpt')
  tr.save_robustness(ref, path)
  variables, meta = convert.convert_file(path, 'resnet50')
  for size in (224, 32):
    model = convert.build_model(meta, lora_rank=8, input_size=size, conv_impl='native')
    check_parity(ref, model, convert.add_lora(model, variables), 'resnet50', size, tr.IMAGENET_MEAN,
                 tr.IMAGENET_STD)


def test_cifar_layout_resnet18_parity_with_its_own_normaliser(ckpt_dir):
  ref = tr.resnet18(num_classes=10, stem='cifar', seed=3)
  path = str(ckpt_dir / 'cifar.pt')
  tr.save_robustness(ref, path, mean=CIFAR_MEAN, std=CIFAR_STD)
  model, variables = convert.from_torch(path, 'resnet18_cifar', lora_rank=8, conv_impl='native')
  assert model.stem == 'cifar' and model.input_size == 32 and model.num_classes == 10
  np.testing.assert_allclose(model.mean, CIFAR_MEAN, atol=1e-7)  # stored with the weights, applied inside
  lora_b = [v for p, v in jax.tree_util.tree_leaves_with_path(variables['params']) if 'lora_B' in str(p)]
  assert lora_b and all(not np.any(b) for b in lora_b)
  check_parity(ref, model, variables, 'resnet18_cifar', 32, CIFAR_MEAN, CIFAR_STD, nat=True)


def test_cifar_layout_without_normaliser_takes_raw_inputs(tmp_path):
  ref = tr.resnet18(num_classes=10, width=8, stem='cifar', seed=4)
  path = str(tmp_path / 'plain.pth')
  tr.save_plain(ref, path)
  model, variables = convert.from_torch(path, 'resnet18_cifar', conv_impl='native')
  assert model.mean is None and model.std is None
  x = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  np.testing.assert_allclose(model.apply(variables, x), torch_logits(ref, x, None, None)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize('prefix,under', [('', None), ('model.', None), ('module.', None), ('', 'state_dict'),
                                          ('module.', 'model')])
def test_plain_and_prefixed_state_dicts_convert_alike(tmp_path, prefix, under):
  ref = tr.resnet18(width=8, seed=5)
  tr.save_robustness(ref, str(tmp_path / 'robust.ckpt'))
  tr.save_plain(ref, str(tmp_path / 'plain.pth'), prefix=prefix, under=under)
  expected, _ = convert.convert_file(str(tmp_path / 'robust.ckpt'), 'resnet18')
  got, meta = convert.convert_file(str(tmp_path / 'plain.pth'), 'resnet18')
  assert meta['layout'] == ('prefixed' if prefix else 'plain')
  assert meta['normalization'] == 'imagenet' and tuple(meta['mean']) == models.IMAGENET_MEAN
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
  # OIHW -> HWIO and the transposed head, checked on concrete entries.
  sd = ref.state_dict()
  np.testing.assert_array_equal(got['params']['layer2_0']['downsample_conv']['kernel'],
                                sd['layer2.0.downsample.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got['params']['head']['kernel'], sd['fc.weight'].numpy().T)
  np.testing.assert_array_equal(got['batch_stats']['layer1_1']['bn2']['var'], sd['layer1.1.bn2.running_var'])


def test_normaliser_other_than_imagenet_is_reported_and_applied(tmp_path, caplog):
  ref = tr.resnet18(width=8, seed=6)
  path = str(tmp_path / 'odd.ckpt')
  tr.save_robustness(ref, path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  with caplog.at_level(logging.WARNING, logger='autolora_jax.convert'):
    model, variables = convert.from_torch(path, 'resnet18', input_size=32, conv_impl='native')
  assert 'differs from the ImageNet statistics' in caplog.text
  assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.25, 0.25, 0.25)
  x = np.random.RandomState(1).rand(2, 32, 32, 3).astype(np.float32)
  np.testing.assert_allclose(model.apply(variables, x), torch_logits(ref, x, (0.5,) * 3, (0.25,) * 3)[0],
                             atol=TOL, rtol=0)


def test_unused_keys_are_reported_by_name(tmp_path, caplog):
  ref = tr.resnet18(width=8, seed=7)
  sd = {'module.model.' + k: v for k, v in ref.state_dict().items()}
  sd['module.model.extra_head.weight'] = torch.zeros(3, 3)
  sd['optimizer_step'] = torch.tensor(1)
  torch.save({'model': sd}, str(tmp_path / 'extra.ckpt'))
  with caplog.at_level(logging.WARNING, logger='autolora_jax.convert'):
    _, meta = convert.convert_file(str(tmp_path / 'extra.ckpt'), 'resnet18')
  assert meta['unused_keys'] == ['optimizer_step', 'module.model.extra_head.weight']
  assert 'module.model.extra_head.weight' in caplog.text


# -- errors ------------------------------------------------------------------------------------------------

def test_missing_file_error(tmp_path):
  with pytest.raises(CheckpointError, match='does not exist'):
    convert.from_torch(str(tmp_path / 'nope.ckpt'), 'resnet18')


def test_not_a_checkpoint_error(tmp_path):
  path = tmp_path / 'notes.ckpt'
  path.write_text('these are not weights\n')
  with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
    convert.from_torch(str(path), 'resnet18')
  torch.save({'epoch': 3, 'note': 'no tensors'}, str(tmp_path / 'empty.ckpt'))
  with pytest.raises(CheckpointError, match='holds no state dict'):
    convert.from_torch(str(tmp_path / 'empty.ckpt'), 'resnet18')


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
  tr.save_robustness(tr.resnet50(width=8, seed=8), str(tmp_path / 'r50.ckpt'))
  with pytest.raises(CheckpointError) as e:
    convert.from_torch(str(tmp_path / 'r50.ckpt'), 'resnet18')
  msg = str(e.value)
  assert 'does not hold a resnet18' in msg
  assert 'layer1.0.conv1.weight has shape (8, 8, 1, 1), resnet18 expects (8, 8, 3, 3)' in msg
  assert 'It looks like resnet50 (imagenet stem): try --arch=resnet50' in msg
  tr.save_plain(tr.resnet18(num_classes=10, width=8, stem='cifar'), str(tmp_path / 'cifar.pth'))
  with pytest.raises(CheckpointError, match=r'conv1.weight has shape \(8, 3, 3, 3\), resnet18 expects '
                                            r'\(8, 3, 7, 7\).*try --arch=resnet18_cifar'):
    convert.from_torch(str(tmp_path / 'cifar.pth'), 'resnet18')


def test_missing_torch_names_the_install_command(tmp_path, monkeypatch):
  tr.save_plain(tr.resnet18(width=8), str(tmp_path / 'r18.pth'))
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  with pytest.raises(CheckpointError, match='pip install torch'):
    convert.from_torch(str(tmp_path / 'r18.pth'), 'resnet18')


def test_pickled_objects_need_allow_pickle(tmp_path):
  torch.save({'model': tr.resnet18(width=8).state_dict(), 'args': Args()}, str(tmp_path / 'args.ckpt'))
  with pytest.raises(CheckpointError, match='--allow_pickle'):
    convert.convert_file(str(tmp_path / 'args.ckpt'), 'resnet18')
  variables, _ = convert.convert_file(str(tmp_path / 'args.ckpt'), 'resnet18', allow_pickle=True)
  assert variables['params']['conv1']['kernel'].shape == (7, 7, 3, 8)


class Args:  # a pickled Python object, as some training scripts store their arguments
  lr = 0.1


# -- the command line and config.pretrained --------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'autolora_jax.convert', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})


@pytest.mark.slow
def test_cli_writes_orbax_that_config_pretrained_loads(tmp_path):
  ref = tr.resnet18(num_classes=10, width=8, stem='cifar', seed=9)
  src = str(tmp_path / 'cifar.ckpt')
  tr.save_robustness(ref, src, mean=CIFAR_MEAN, std=CIFAR_STD)
  dst = str(tmp_path / 'converted')
  done = _cli(f'--src={src}', f'--dst={dst}', '--arch=resnet18_cifar')
  assert done.returncode == 0, done.stderr
  assert 'Fine-tune with --config.pretrained=' in done.stdout
  on_the_fly, meta_file = convert.convert_file(src, 'resnet18_cifar')
  stored, meta_dir = convert.load(dst)
  jax.tree_util.tree_map(np.testing.assert_array_equal, stored, on_the_fly)
  assert meta_dir == meta_file

  # config.pretrained=DIR and =FILE give the same FE, and the checkpoint's normalisation reaches the model.
  for pretrained in (dst, src):
    config = default.get_config()
    config.model.stem, config.model.width, config.pretrained = 'cifar', 8, pretrained
    config.model.input_size = 32
    variables, meta = load_pretrained(config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, on_the_fly)
    mean, std = experiment.resolve_normalization(config.model, meta, pretrained)
    np.testing.assert_allclose(mean, CIFAR_MEAN, atol=1e-7)
    np.testing.assert_allclose(std, CIFAR_STD, atol=1e-7)
    fe = variables
    shapes = jax.eval_shape(lambda: models.create_model(config.model, 5).init(
        jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))
    target = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)  # fresh: all 7
    merged, report = pretrain.transplant(fe, target)
    assert report['unused'] == ['params/head/bias', 'params/head/kernel']  # the old 10-way head
    np.testing.assert_array_equal(merged['params']['layer3_0']['conv1']['kernel'],
                                  on_the_fly['params']['layer3_0']['conv1']['kernel'])
    assert merged['params']['head']['kernel'].shape == (512 // 8, 5)
    assert np.all(merged['params']['head']['kernel'] == 7.0)  # the new head and LoRa stay as initialised
    assert np.all(merged['params']['layer4_1']['conv2']['lora_A'] == 7.0)

  # The wrong architecture for the folder, and an existing --dst, are clear errors.
  config = default.get_config()
  config.model.width, config.pretrained = 8, dst
  with pytest.raises(CheckpointError, match='holds a converted resnet18_cifar.*--config.model.stem=cifar'):
    load_pretrained(config)
  again = _cli(f'--src={src}', f'--dst={dst}', '--arch=resnet18_cifar')
  assert again.returncode == 2 and 'exists already' in again.stderr and 'Traceback' not in again.stderr


def load_pretrained(config):
  m = config.model
  return pretrain.load_pretrained(config.pretrained, m.arch, m.stem, m.width)


def test_cli_missing_file_is_a_clean_error(tmp_path):
  done = _cli(f'--src={tmp_path}/missing.ckpt', f'--dst={tmp_path}/out', '--arch=resnet50')
  assert done.returncode == 2
  assert 'does not exist' in done.stderr and 'Traceback' not in done.stderr
  assert not os.path.exists(tmp_path / 'out')


def test_config_pretrained_errors(tmp_path):
  config = default.get_config()
  config.pretrained = str(tmp_path / 'absent')
  with pytest.raises(CheckpointError, match='does not exist'):
    load_pretrained(config)
  os.makedirs(tmp_path / 'some_folder')
  config.pretrained = str(tmp_path / 'some_folder')
  with pytest.raises(CheckpointError, match='is not a converted checkpoint'):
    load_pretrained(config)
  tr.save_plain(tr.resnet18(width=8), str(tmp_path / 'narrow.pth'))
  config.pretrained = str(tmp_path / 'narrow.pth')
  with pytest.raises(CheckpointError, match='width 8.*--config.model.width=8'):
    load_pretrained(config)
