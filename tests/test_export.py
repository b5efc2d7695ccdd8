"""Export to PyTorch: logits and input-gradient parity of model.pt, the safetensors round trip through the
converter, model.pt without the package, the load API, the cross-check with the original AutoAttack, the
README example, and the errors."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import helpers  # noqa: E402
import tiny_runs  # noqa: E402
from autolora_jax import api, convert, export, models, train  # noqa: E402
from autolora_jax.errors import CheckpointError, WorkdirError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def with_random_statistics(variables, seed=3):
  """Variables whose BatchNorm running statistics are far from (0, 1), as a trained model's are."""
  rng = np.random.default_rng(seed)

  def fill(path, value):
    name = path[-1].key
    if name.endswith('mean'):
      return rng.normal(0, 0.3, np.shape(value)).astype(np.float32)
    if name.endswith('var'):
      return rng.uniform(0.5, 2.0, np.shape(value)).astype(np.float32)
    return value

  return {**variables, 'batch_stats': jax.tree_util.tree_map_with_path(fill, variables['batch_stats'])}


# (arch, model) of every family and stem the project trains; sizes kept small.
CASES = {
    'resnet18_imagenet': ('resnet18', lambda: models.resnet18(7, width=8, input_size=32, stem='imagenet')),
    'resnet18_cifar': ('resnet18', lambda: models.resnet18(5, width=8, input_size=16, stem='cifar',
                                                           mean=CIFAR_MEAN, std=CIFAR_STD)),
    'resnet50': ('resnet50', lambda: models.resnet50(4, width=8, input_size=32, stem='imagenet')),
    'resnet50_cifar_no_norm': ('resnet50', lambda: models.resnet50(3, width=4, input_size=8, stem='cifar',
                                                                   mean=None, std=None)),
    'vit': ('vit_s16', lambda: helpers.tiny_vit(6)),
    'vit_convstem': ('vit_s16', lambda: helpers.tiny_vit(6, stem='convstem', patch_size=16, input_size=32)),
    # ViT-S/16's own sizes (the converter reads only the published ones) at a 2 x 2 grid.
    'vit_s16': ('vit_s16', lambda: models.vit_s16(6, input_size=32)),
    'vit_s16_convstem': ('vit_s16', lambda: models.vit_s16(6, input_size=32, stem='convstem')),
    'twins': ('resnet18', lambda: models.resnet18(5, width=8, input_size=16, stem='cifar', lora_rank=0,
                                                  twin_bn=True)),
}


def case(name):
  arch, make = CASES[name]
  model = make()
  size = model.input_size
  variables = helpers.init(model, size=size)
  if not isinstance(model, models.ViT):
    variables = with_random_statistics(variables)
  if name != 'twins':
    variables = helpers.with_nonzero_lora_b(variables, scale=0.5)  # the deployed branch must not use them
  return arch, model, variables


def jax_logits(model, variables, x):
  return np.asarray(model.apply(variables, jnp.asarray(x), branch='adv', train=False))


def images(n, h, w, seed=0, c=3):
  return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('name', [n for n in CASES if n not in ('vit_s16', 'vit_s16_convstem')])
def test_model_pt_gives_the_jax_logits(tmp_path, name):
  arch, model, variables = case(name)
  size = model.input_size
  x = images(6, size + 5, size + 5)  # not the model's size: the resize inside is part of the program
  expected = jax_logits(model, variables, x)
  path = str(tmp_path / 'model.pt')
  export.script(export.torch_model(model, variables, arch)).save(path)
  got = torch.jit.load(path)(nchw(x)).detach().numpy()
  assert got.shape == expected.shape
  assert rel(got, expected) < 1e-4


@pytest.mark.parametrize('name', ['resnet18_imagenet', 'resnet18_cifar', 'resnet50', 'vit_s16', 'vit_s16_convstem'])
def test_safetensors_round_trip_through_the_converter(tmp_path, name):
  from safetensors.numpy import load_file, save_file
  arch, model, variables = case(name)
  spec = export.model_spec(model, variables, arch)
  path = str(tmp_path / 'model.safetensors')
  save_file(convert.export_state_dict(variables, spec['convert_arch']), path)
  weights, _ = convert.split_state_dict(load_file(path))
  back, report = convert.convert_state_dict(weights, spec['convert_arch'])
  assert report['unused'] == []
  rebuilt = model.clone(lora_rank=0)
  x = images(4, model.input_size, model.input_size, seed=1)
  assert rel(jax_logits(rebuilt, back, x), jax_logits(model, variables, x)) < 1e-5
  # Every exported leaf is the original one, bit for bit (no LoRa factor, no frozen twin among them).
  deployed = dict(convert.deployed_paths(variables))
  assert set(deployed) == {p for p, _ in convert.deployed_paths(back)}
  for p, v in convert.deployed_paths(back):
    np.testing.assert_array_equal(v, np.asarray(deployed[p], np.float32))


def test_export_keys_are_the_reference_layouts():
  _, model, variables = case('resnet18_imagenet')
  keys = set(convert.export_state_dict(variables, 'resnet18'))
  assert {'conv1.weight', 'bn1.running_var', 'layer2.0.downsample.0.weight', 'layer2.0.downsample.1.bias',
          'fc.weight', 'layer4.1.bn2.num_batches_tracked'} <= keys
  assert not any('lora' in k or 'shortcut' in k for k in keys)
  _, model, variables = case('resnet18_cifar')
  keys = set(convert.export_state_dict(variables, 'resnet18_cifar'))
  assert {'layer2.0.shortcut.0.weight', 'layer2.0.shortcut.1.running_mean', 'linear.bias'} <= keys
  _, model, variables = case('vit_convstem')
  keys = set(convert.export_state_dict(variables, 'vit_s16_convstem'))
  assert {'cls_token', 'pos_embed', 'patch_embed.proj.stem.0.weight', 'patch_embed.proj.stem.1.bias',
          'patch_embed.proj.stem.12.weight', 'blocks.1.attn.qkv.weight', 'blocks.0.mlp.fc2.bias',
          'norm.weight', 'head.weight'} <= keys
  _, model, variables = case('twins')
  keys = convert.export_state_dict(variables, 'resnet18_cifar')
  assert not any('frozen' in k for k in keys)


@pytest.mark.parametrize('name', ['resnet18_cifar', 'vit'])
def test_model_pt_input_gradient_equals_the_jax_models(tmp_path, name):
  arch, model, variables = case(name)
  x = images(3, model.input_size, model.input_size, seed=2)
  w = np.random.default_rng(5).normal(size=(3, model.num_classes)).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(model.apply(variables, x, branch='adv', train=False) * w))(jnp.asarray(x))
  path = str(tmp_path / 'model.pt')
  export.script(export.torch_model(model, variables, arch)).save(path)
  xt = nchw(x).requires_grad_(True)
  (torch.jit.load(path)(xt) * torch.from_numpy(w)).sum().backward()
  got = xt.grad.numpy().transpose(0, 2, 3, 1)
  assert rel(got, np.asarray(grad)) < 1e-4


# -- a finished run -----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A tiny finished AutoLoRa run on the 8x8 digits (one epoch, AutoAttack fast on 16 points)."""
  config = tiny_runs.tiny_config(epochs=1)
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 16
  config.autoattack.batch_size = 16
  workdir = str(tmp_path_factory.mktemp('run') / 'workdir')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_load_gives_the_runs_model_and_numbers(finished_run):
  run = api.load(finished_run)
  results = json.load(open(os.path.join(finished_run, 'results.json')))
  assert run.checkpoint == 'best' and run.epoch == results['best']['epoch']
  assert run.classes == [5, 6, 7, 8, 9] and run.num_classes == 5  # the demo's digits, in label order
  assert run.input_shape == [3, 8, 8] == results['input_shape']
  assert run.norm == 'Linf' and run.eps == pytest.approx(8 / 255)
  x, y = run.test_points(0)
  assert len(y) == results['num_test']
  accuracy = float(np.mean(np.argmax(np.asarray(run.logits(x)), -1) == y))
  assert accuracy == pytest.approx(results['best']['test']['clean'], abs=1e-9)
  final = api.load(finished_run, checkpoint='final')
  assert final.epoch == results['final']['epoch']


def test_export_writes_the_four_files_and_model_pt_gives_the_logits(finished_run, tmp_path):
  out = str(tmp_path / 'export')
  card = export.export(finished_run, out)
  assert sorted(os.listdir(out)) == sorted(export.FILES)
  meta = json.load(open(os.path.join(out, 'model.json')))
  assert meta['arch'] == 'resnet18' and meta['stem'] == 'cifar' and meta['convert_arch'] == 'resnet18_cifar'
  assert meta['input_shape'] == [3, 8, 8] and meta['num_classes'] == 5 and meta['classes'] == [5, 6, 7, 8, 9]
  assert meta['threat_model'] == {'norm': 'Linf', 'eps': pytest.approx(8 / 255)}
  results = json.load(open(os.path.join(finished_run, 'results.json')))
  assert meta['epoch'] == results['best']['epoch'] and meta['test'] == results['best']['test']
  assert meta['package_version'] and card['out'] == os.path.abspath(out)
  run = api.load(finished_run)
  x, _ = run.test_points(32)
  got = torch.jit.load(os.path.join(out, 'model.pt'))(nchw(x)).detach().numpy()
  assert rel(got, np.asarray(run.logits(x))) < 1e-4
  readme = open(os.path.join(out, 'README.md')).read()
  assert "torch.jit.load('model.pt')" in readme and '--check=' in readme
  # The safetensors file converts back with the converter (no torch needed on that path).
  weights, _ = convert.split_state_dict(__import__('safetensors.numpy').numpy.load_file(
      os.path.join(out, 'model.safetensors')))
  back, _ = convert.convert_state_dict(weights, meta['convert_arch'])
  rebuilt = run.model.clone(lora_rank=0)
  assert rel(np.asarray(rebuilt.apply(back, x, branch='adv', train=False)), np.asarray(run.logits(x))) < 1e-5


def test_model_pt_loads_where_the_package_cannot_be_imported(finished_run, tmp_path):
  out = str(tmp_path / 'export')
  export.export(finished_run, out)
  code = ('import sys; sys.modules["autolora_jax"] = None\n'
          'import torch\n'
          'try:\n    import autolora_jax\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit("imported")\n'
          f'm = torch.jit.load({os.path.join(out, "model.pt")!r})\n'
          'print(tuple(m(torch.rand(2, 3, 8, 8)).shape))\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  done = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == '(2, 5)'


def test_export_errors_write_nothing(finished_run, tmp_path, monkeypatch):
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'keep.txt').write_text('mine')
  with pytest.raises(export.ExportError, match='exists and is not empty.*--overwrite'):
    export.export(finished_run, str(taken))
  assert os.listdir(taken) == ['keep.txt']
  with pytest.raises(CheckpointError, match="Unknown checkpoint 'last'.*best.*final"):
    export.export(finished_run, str(tmp_path / 'a'), checkpoint='last')
  with pytest.raises(WorkdirError, match='has no config.json'):
    export.export(str(tmp_path), str(tmp_path / 'b'))
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  (unfinished / 'config.json').write_text(open(os.path.join(finished_run, 'config.json')).read())
  with pytest.raises(WorkdirError, match='no training checkpoint'):
    export.export(str(unfinished), str(tmp_path / 'c'))
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(export.ExportError, match='needs PyTorch.*pip install torch'):
    export.export(finished_run, str(tmp_path / 'd'))
  assert sorted(os.listdir(tmp_path)) == ['taken', 'unfinished']


def test_crosscheck_needs_pyautoattack(monkeypatch):
  from autolora_jax.export import crosscheck
  monkeypatch.setitem(sys.modules, 'pyautoattack', None)
  with pytest.raises(export.ExportError, match='pip install pyautoattack'):
    crosscheck.import_original()


@pytest.mark.slow
def test_cli_export_and_crosscheck_with_the_original_autoattack(finished_run, tmp_path):
  pytest.importorskip('pyautoattack')
  out = tmp_path / 'export'
  done = subprocess.run([sys.executable, '-m', 'autolora_jax.export', f'--workdir={finished_run}', f'--out={out}',
                         '--check=16'], cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.load(open(out / 'crosscheck.json'))
  assert report['num_points'] == 16 and report['attacks'] == ['apgd-ce', 'apgd-t']
  results = json.load(open(os.path.join(finished_run, 'results.json')))
  assert report['ours']['robust_accuracy'] == results['best']['test']['autoattack']  # the run's own points
  assert report['clean_agreement'] == 16  # the same model: the same clean verdicts
  assert report['agreement'] >= 14
  assert abs(report['ours']['robust_accuracy'] - report['original']['robust_accuracy']) <= 2 / 16
  assert 'per-point agreement' in done.stdout and '## Cross-check' in open(out / 'README.md').read()
  again = subprocess.run([sys.executable, '-m', 'autolora_jax.export', f'--workdir={finished_run}',
                          f'--out={out}'], cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert again.returncode == 2 and again.stderr.startswith('error: ') and '--overwrite' in again.stderr
  assert (out / 'crosscheck.json').exists()  # refused: nothing lost


def readme_example():
  """The README's Python example (the block after '<!-- example: load -->')."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  found = re.search(r'<!-- example: load -->\s*```python\n(.*?)```', text, re.S)
  assert found, 'README.md has no load example'
  return found.group(1)


@pytest.mark.slow
def test_the_export_docs_example_runs(finished_run, tmp_path):
  """docs/export.md's PyTorch lines on an export of the tiny run (its folder and image shape in place of the
  demo's): the program loads without this package and gives the model's logits."""
  torch = pytest.importorskip('torch')
  text = open(os.path.join(ROOT, 'docs', 'export.md')).read()
  (block,) = re.findall(r'```python\n(.*?)```', text, re.S)
  card = export.export(finished_run, str(tmp_path / 'exp'))
  assert 'torch.rand(8, 3, 28, 28)' in block and "'/tmp/demo_export/model.pt'" in block
  code = block.replace("'/tmp/demo_export/model.pt'", repr(str(tmp_path / 'exp' / 'model.pt'))).replace(
      'torch.rand(8, 3, 28, 28)', f'torch.rand(8, {", ".join(map(str, card["input_shape"]))})')
  namespace = {}
  exec(compile(code, 'docs/export.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert isinstance(namespace['model'], torch.jit.ScriptModule)
  assert tuple(namespace['logits'].shape) == (8, card['num_classes'])


@pytest.mark.slow
def test_readme_example_runs(finished_run, tmp_path):
  code = readme_example().replace("'/tmp/demo'", repr(finished_run)).replace("'/tmp/demo_export'",
                                                                            repr(str(tmp_path / 'exp')))
  assert repr(finished_run) in code
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert os.path.isfile(tmp_path / 'exp' / 'model.pt')
  run = namespace['run']
  assert len(namespace['labels']) == run.config.autoattack.num_points == 16
  # The run's own AutoAttack numbers again: the same points, the same per-point random draws.
  assert namespace['result'].robust_accuracy == run.results['best']['test']['autoattack']
