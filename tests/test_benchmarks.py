"""benchmarks/: the PyTorch reference computes our step, and benchmarks/step.py runs and writes its JSON.

Tolerances: logits of the two frameworks on the same weights agree to 1e-4 relative to the largest
(observed 1e-6); after one train step every updated tensor agrees to 1e-3 of its largest entry
(observed <= 6e-5, in BatchNorm biases).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from autolora_jax import models, steps

try:
  import torch

  from benchmarks import torch_reference
except ImportError:  # torch is optional: the benchmark then times ours alone
  torch = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


@pytest.mark.slow
@pytest.mark.skipif(torch is None, reason='torch is not installed')
def test_reference_step_computes_our_step():
  model = models.resnet18(10, width=8, input_size=32)  # XLA's convolution, as the reference's
  rng = np.random.default_rng(0)
  x = rng.random((4, 32, 32, 3), dtype=np.float32)
  y = rng.integers(0, 10, 4).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  params = jax.tree_util.tree_map_with_path(  # non-zero LoRa B, so that the branches differ
      lambda p, v: v + 0.05 if 'lora_B' in jax.tree_util.keystr(p) else v, variables['params'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}
  ref = torch_reference.load_flax_variables(torch_reference.resnet18(10, width=8, input_size=32), variables,
                                            (2, 2, 2, 2))
  ref.eval()
  with torch.no_grad():
    for branch in ('adv', 'nat'):
      assert _rel(np.asarray(model.apply(variables, x, branch=branch)),
                  ref(torch_reference.to_nchw(x), branch).numpy()) < 1e-4

  check_one_step(model, variables, ref, x, y, lambda v: torch_reference.load_flax_variables(
      torch_reference.resnet18(10, width=8, input_size=32), v, (2, 2, 2, 2)))


def check_one_step(model, variables, ref, x, y, to_torch):
  """One train step with eps = 0 (x_adv = x, so that the random starts cannot differ): the same loss, the
  same updated parameters and BatchNorm statistics, i.e. the same gradient routing and optimizer.
  `to_torch(variables)` is the reference model holding our updated variables."""
  state = steps.create_train_state(model, variables, steps.make_optimizer(0.1, 0.9, 1e-4), l1=0.3, l2=2.0)
  train_step = jax.jit(steps.make_train_step(model, eps=0.0, step_size=0.0, steps=1, axis_name=None))
  batch = {'image': x, 'label': y, 'index': np.arange(len(y))}
  new_state, metrics = train_step(state, batch, jax.random.PRNGKey(0))
  step = torch_reference.AutoLoRaStep(ref, lr=0.1, l1=0.3, l2=2.0, eps=0.0, step_size=0.0, steps=1)
  out = step(torch_reference.to_nchw(x), torch.from_numpy(y.astype(np.int64)))
  np.testing.assert_allclose(out['loss'], float(metrics['loss']), rtol=1e-5)
  ours = to_torch({'params': new_state.params, 'batch_stats': new_state.batch_stats}).state_dict()
  for name, value in ref.state_dict().items():
    if value.dtype == torch.float32:
      assert _rel(value.numpy(), ours[name].numpy()) < 1e-3, name


@pytest.mark.slow
@pytest.mark.skipif(torch is None, reason='torch is not installed')
def test_reference_vit_step_computes_our_step():
  """The ViT reference (a 2-block ViT of width 32 at 32x32: 4 patches and the class token) computes our
  logits on both branches and our train step: the same loss and the same updated tensors."""
  model = models.vit_s16(10, dim=32, depth=2, heads=2, input_size=32)
  rng = np.random.default_rng(1)
  x = rng.random((4, 32, 32, 3), dtype=np.float32)
  y = rng.integers(0, 10, 4).astype(np.int32)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if 'lora_B' in jax.tree_util.keystr(p) else v,
      model.init(jax.random.PRNGKey(0), x[:1])['params'])
  variables = {'params': params, 'batch_stats': {}}
  make_ref = lambda v: torch_reference.load_flax_vit(  # noqa: E731
      torch_reference.ViT(32, 2, 2, 10, input_size=32), v)
  ref = make_ref(variables)
  with torch.no_grad():
    for branch in ('adv', 'nat'):
      assert _rel(np.asarray(model.apply(variables, x, branch=branch)),
                  ref(torch_reference.to_nchw(x), branch).numpy()) < 1e-4
  check_one_step(model, variables, ref, x, y, make_ref)


@pytest.mark.slow
def test_step_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'benchmarks.step', '--arch=resnet18', '--width=8',
         '--resolution=32', '--batch=2', '--reps=1', '--parts=train', f'--json={out}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ours img/s' in proc.stdout
  result = json.loads(out.read_text())
  case, = result['cases']
  assert (case['part'], case['arch'], case['resolution'], case['batch']) == ('train', 'resnet18', 32, 2)
  keys = ['ours_img_per_s', 'ours_compile_s', 'flops_per_image', 'ours_flop_per_s', 'ours_peak_bytes',
          'ours_times_s']
  if torch is not None:
    keys += ['torch_img_per_s', 'ratio', 'torch_peak_bytes']
  for key in keys:
    assert key in case, key
  assert case['ours_img_per_s'] > 0
  if torch is not None:
    np.testing.assert_allclose(case['ratio'], case['ours_img_per_s'] / case['torch_img_per_s'])
  else:
    assert 'torch_skipped' in case
  assert case['flops_per_image'] == pytest.approx(26 * models_forward_flops(), rel=1e-6)
  assert {'machine', 'settings'} <= set(result)


@pytest.mark.slow
def test_step_benchmark_runs_convnext_and_swin_at_a_tiny_size(tmp_path):
  """The lead's command (--arch=convnext_t,swin_t) with the families shrunk to run in seconds."""
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'benchmarks.step', '--arch=convnext_t,swin_t', '--resolution=32', '--batch=2',
         '--reps=1', '--parts=train', '--dim=8', '--depths=1,1,1,1', '--heads=1', '--window=4', f'--json={out}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cases = json.loads(out.read_text())['cases']
  assert [c['arch'] for c in cases] == ['convnext_t', 'swin_t'] and all(c['ours_img_per_s'] > 0 for c in cases)
  assert all('ours_peak_bytes' in c for c in cases)


def models_forward_flops():
  """FLOPs of one forward pass of the width-8 ResNet-18 at 32 x 32, counted by hand (2 per multiply-add)."""
  total, side, c_in = 2 * 16 * 16 * 7 * 7 * 3 * 8, 8, 8  # stem: 32 -> 16, then max-pool -> 8
  for stage, c in enumerate((8, 16, 32, 64)):
    for block in range(2):
      stride = 2 if (stage > 0 and block == 0) else 1
      side //= stride
      total += 2 * side * side * 9 * c_in * c + 2 * side * side * 9 * c * c
      if stride == 2 or c_in != c:
        total += 2 * side * side * c_in * c
      c_in = c
  return total + 2 * 64 * 10  # head


@pytest.mark.slow
def test_input_pipeline_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / 'pipeline.json'
  cmd = [sys.executable, '-m', 'benchmarks.input_pipeline', '--images=4', '--workers=1', '--batch=8',
         '--steps=2', '--reps=1', f'--json={out}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ms of host time per step' in proc.stdout and 'images/s per core' in proc.stdout
  result = json.loads(out.read_text())
  assert result['devices'] == 4  # the fake CPU devices the loop part runs on
  assert set(result['pools']) == {'1 threads', '1 processes'} and set(result['dataset']) == {'1 threads'}
  assert all(v > 0 for v in result['decode_per_core'].values()) and result['loop_ms_per_step'] > 0
  assert 0 < result['epoch']['save returns (ms)'] and 0 < result['epoch']['save on disk (ms)']
