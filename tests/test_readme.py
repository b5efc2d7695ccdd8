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
  """The Python blocks of the section titled `section` in the README or a page of docs/."""
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    if f'## {section}\n' in text:
      body = text.split(f'## {section}\n', 1)[1].split('\n## ', 1)[0]
      return re.findall(r'```python\n(.*?)```', body, flags=re.S)
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
