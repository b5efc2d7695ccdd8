"""The Python examples of the README and docs/ run as written (their names are the users' contract)."""

import glob
import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_README = os.path.join(ROOT, 'README.md')
DOCS = [ROOT_README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def python_blocks(section: str):
  """The Python blocks of the section titled `section` (any level) in the README or a page of docs/: from
  its heading to the next heading of its level or above, outside code blocks."""
  for path in DOCS:
    with open(path) as f:
      lines = f.read().split('\n')
    level, body, fenced = None, [], False
    for line in lines:
      if line.startswith('```'):
        fenced = not fenced
      heading = None if fenced else re.match(r'(#+) (.*)', line)
      if heading and level is None and heading.group(2) == section:
        level = len(heading.group(1))
        continue
      if level is not None:
        if heading and len(heading.group(1)) <= level:
          break
        body.append(line)
    if level is not None:
      return re.findall(r'```python\n(.*?)```', '\n'.join(body), flags=re.S)
  raise AssertionError(f'no section {section!r} in README.md or docs/')


@pytest.mark.slow
def test_the_method_as_pure_functions_example_runs():
  (block,) = python_blocks('The method, as pure functions')
  rng = np.random.default_rng(0)
  # What the example leaves to the reader: a batch, its labels, logits, scalars and an epoch's numbers.
  namespace = {'x': rng.uniform(size=(2, 224, 224, 3)).astype(np.float32), 'y': np.array([3, 7]),
               'z_nat': rng.normal(size=(2, 200)).astype(np.float32),
               'z_adv': rng.normal(size=(2, 200)).astype(np.float32),
               'l1': 0.3, 'l2': 4.2, 'nat_acc': 0.7, 'epoch': 1, 'robust_acc': 0.4}
  exec(compile(block, ROOT_README, 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['logits'].shape == (2, 200)
  x_adv = np.asarray(namespace['x_adv'])
  assert 0 < np.abs(x_adv - namespace['x']).max() <= 8 / 255 + 1e-6
  assert (namespace['l1'], namespace['l2']) == pytest.approx((0.3, 4.2))
  assert namespace['decision'].lr == 0.01 and not namespace['decision'].stop
  assert callable(namespace['train_step'])
  assert isinstance(namespace['loss'], jax.Array)


@pytest.mark.slow
def test_the_vit_example_runs():
  (block,) = python_blocks('Vision Transformers: ViT-S/16, ViT-B/16 and their ConvStem variants')
  namespace = {'x': np.random.default_rng(0).uniform(size=(1, 224, 224, 3)).astype(np.float32)}
  exec(compile(block, ROOT_README, 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['logits'].shape == (1, 200)
  qkv = namespace['variables']['params']['blocks_0']['attn']['qkv']
  assert set(qkv) == {'kernel', 'bias', 'q', 'v'}  # LoRa on the query and value slices only


def test_the_host_settings_example_runs():
  """docs/benchmarks.md's host settings, in a fresh interpreter (they must come before the first JAX
  computation): the malloc settings and XLA's CPU flags are in its environment afterwards."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (block,) = python_blocks('Benchmarks: speed against the PyTorch reference')
  check = block + "\nimport os\nprint(os.environ.get('XLA_FLAGS', ''))\n"
  done = subprocess.run([sys.executable, '-c', check], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  assert '--xla_cpu' in done.stdout


@pytest.mark.slow
def test_the_conversion_example_runs(tmp_path, monkeypatch):
  """docs/checkpoints_and_data.md's conversion example on a robustness-library checkpoint the test writes
  (a ResNet-18 with random weights) at the path the example names: the converted model gives the PyTorch
  model's ImageNet logits."""
  torch = pytest.importorskip('torch')
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  (block,) = python_blocks('2. Converting them')
  ref = tr.resnet18(seed=1)
  (tmp_path / 'checkpoints').mkdir()
  tr.save_robustness(ref, str(tmp_path / 'checkpoints' / 'resnet18_linf_eps4.0.ckpt'))
  monkeypatch.chdir(tmp_path)
  x = np.random.default_rng(0).uniform(size=(1, 224, 224, 3)).astype(np.float32)
  namespace = {'x': x}
  exec(compile(block, 'docs/checkpoints_and_data.md', 'exec'), namespace)  # pylint: disable=exec-used
  mean = torch.tensor(tr.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(tr.IMAGENET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    want = ref((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std).numpy()
  np.testing.assert_allclose(np.asarray(namespace['logits']), want, rtol=0, atol=2e-3)


def test_the_convnext_and_swin_examples_run():
  """docs/convnext_swin.md's LoRa example (a tiny Swin, both branches equal at B = 0) and its stochastic
  depth example (a tiny ConvNeXt in training mode with one key per image)."""
  for section in ('Where LoRa goes', 'Stochastic depth'):
    (block,) = python_blocks(section)
    namespace = {}
    exec(compile(block, 'docs/convnext_swin.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['logits'].shape == (2, 10) and namespace['model'].drop_path == 0.1


def test_the_autoattack_library_example_runs():
  """docs/evaluation.md's AutoAttack example on a model that gets every point wrong: every name it shows
  exists and says so (no attack needs to run)."""
  (block,) = python_blocks('AutoAttack as a library')
  rng = np.random.default_rng(0)
  namespace = {'x': rng.uniform(size=(6, 8, 8, 1)).astype(np.float32), 'y': np.full(6, 1),
               'logits_fn': lambda z: jax.numpy.tile(jax.numpy.array([[5.0, 0.0, 0.0]]), (z.shape[0], 1))}
  exec(compile(block, 'docs/evaluation.md', 'exec'), namespace)  # pylint: disable=exec-used
  result = namespace['result']
  assert result.robust_accuracy == 0.0 and not np.asarray(result.robust).any()
  assert list(result.fell_to) == ['clean'] * 6
  assert result.accuracy['clean'] == 0.0 and result.summary()['version'] == 'standard'
