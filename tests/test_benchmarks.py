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
  x, y, variables = _inputs_and_variables(model, seed=0)
  check_logits_and_step(model, variables, lambda v: torch_reference.load_flax_variables(
      torch_reference.resnet18(10, width=8, input_size=32), v, (2, 2, 2, 2)), x, y)


def check_logits_and_step(model, variables, make_ref, x, y):
  """The reference `make_ref(variables)` gives our logits on both branches, then `check_one_step`."""
  ref = make_ref(variables)
  ref.eval()
  with torch.no_grad():
    for branch in ('adv', 'nat'):
      assert _rel(np.asarray(model.apply(variables, x, branch=branch)),
                  ref(torch_reference.to_nchw(x), branch).numpy()) < 1e-4
  check_one_step(model, variables, ref, x, y, make_ref)


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


def _inputs_and_variables(model, seed):
  """Four 32x32 images, their labels (10 classes) and `model`'s variables, its LoRa B non-zero so that the
  branches differ ('batch_stats' empty for a model without BatchNorm)."""
  rng = np.random.default_rng(seed)
  x = rng.random((4, 32, 32, 3), dtype=np.float32)
  y = rng.integers(0, 10, 4).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if 'lora_B' in jax.tree_util.keystr(p) else v, variables['params'])
  return x, y, {'params': params, 'batch_stats': variables.get('batch_stats', {})}


@pytest.mark.slow
@pytest.mark.skipif(torch is None, reason='torch is not installed')
def test_reference_vit_step_computes_our_step():
  """The ViT reference (a 2-block ViT of width 32 at 32x32: 4 patches and the class token) computes our
  logits on both branches and our train step: the same loss and the same updated tensors."""
  model = models.vit_s16(10, dim=32, depth=2, heads=2, input_size=32)
  x, y, variables = _inputs_and_variables(model, seed=1)
  make_ref = lambda v: torch_reference.load_flax_vit(  # noqa: E731
      torch_reference.ViT(32, 2, 2, 10, input_size=32), v)
  check_logits_and_step(model, variables, make_ref, x, y)


@pytest.mark.slow
@pytest.mark.skipif(torch is None, reason='torch is not installed')
@pytest.mark.parametrize('arch', ['convnext_t', 'swin_t'])
def test_reference_convnext_and_swin_steps_compute_our_step(arch):
  """The ConvNeXt and Swin references of the step benchmark (tiny: widths from 8, one or two blocks per
  stage, a Swin window of 4 at 32x32, so that its last two stages clamp the window to the grid) compute our
  logits on both branches and our train step: the same loss and the same updated tensors."""
  from benchmarks import torch_convnext_swin
  swin = dict(dim=8, heads=1, depths=(2, 2, 1, 1), window=4)
  ours, theirs = {'convnext_t': (dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)), dict(dim=8, depths=(1, 1, 1, 1))),
                  'swin_t': (swin, swin)}[arch]
  model = models.spec(arch).build(10, input_size=32, **ours)
  x, y, variables = _inputs_and_variables(model, seed=2)
  if arch == 'swin_t':  # a bias table that is not near zero, so that its layout matters
    variables['params'] = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.5 * np.sin(np.arange(v.size).reshape(v.shape)) if 'bias_table' in jax.tree_util.keystr(p)
        else v, variables['params'])
  load = {'convnext_t': torch_convnext_swin.load_flax_convnext, 'swin_t': torch_convnext_swin.load_flax_swin}[arch]
  make_ref = lambda v: load(torch_convnext_swin.ARCHITECTURES[arch](10, input_size=32, **theirs), v)  # noqa: E731
  check_logits_and_step(model, variables, make_ref, x, y)


@pytest.mark.slow
def test_step_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'benchmarks.step', '--arch=resnet18', '--width=8', '--conv_impl=native',
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


def test_peak_memory_is_not_hidden_by_memory_freed_just_before():
  """A finished computation's buffers freed on another thread just after it returned (as XLA's runtime frees
  a program's temporary buffers) are not in the next call's base: that call's own 64 MiB show."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from benchmarks import memory  # pylint: disable=g-import-not-at-top
  mib = 1 << 20
  held = [np.ones(256 * mib // 8)]  # 256 MiB, freed 10 ms from now
  threading.Timer(0.01, held.clear).start()
  with memory.PeakMemory() as mem:
    time.sleep(0.1)  # the 256 MiB are gone before the call allocates its own
    own = np.ones(64 * mib // 8)
  del own
  assert 60 * mib <= mem.rise <= 128 * mib, mem.rise / mib


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


def _double(x):
  return jax.jit(lambda v: v * 2.0 + 1.0)(x)


def _called_from_here(x):
  return _double(x)


def test_compile_budget_attributes_each_compilation_to_its_caller():
  """benchmarks/compile_budget.py's recorder: one compilation per new program or shape, none for a repeat,
  each named after the two innermost frames of the code under its root, then grouped by the summary."""
  from benchmarks import compile_budget
  recorder = compile_budget.CompileRecorder(os.path.dirname(os.path.abspath(__file__)))
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  jax.monitoring.register_event_duration_secs_listener(recorder)
  try:
    _called_from_here(np.ones(3, np.float32))
    _called_from_here(np.ones(3, np.float32))  # a new lambda: traced and compiled again
    _called_from_here(np.ones(5, np.float32))
    jax.jit(lambda v: v - 1.0)(np.ones(3, np.float32))
  finally:
    jax.monitoring.unregister_event_duration_listener(recorder)
    jax.config.update('jax_enable_compilation_cache', cached)
  compiled = [r for r in recorder.records if r['field'] == 'compile_s']
  where = 'test_benchmarks.py:_double < test_benchmarks.py:_called_from_here'
  assert [r['where'] for r in compiled] == [where] * 3 + [
      'test_benchmarks.py:test_compile_budget_attributes_each_compilation_to_its_caller']
  assert all(r['name'] == '<lambda>' and r['seconds'] > 0 for r in compiled)
  assert {r['field'] for r in recorder.records} == set(compile_budget.FIELDS)
  summary = compile_budget.summarize(recorder.records, small=0.0)
  first, second = sorted(summary['programs'], key=lambda p: -p['count'])
  assert (first['where'], first['count'], second['count']) == (where, 3, 1)
  assert summary['totals']['count'] == 4 and summary['small']['count'] == 0
  np.testing.assert_allclose(summary['totals']['compile_s'], sum(r['seconds'] for r in compiled))
  everything_small = compile_budget.summarize(recorder.records, small=1e9)
  assert everything_small['programs'] == [] and everything_small['small']['groups'] == 2
  assert 'total' in compile_budget.table(summary, wall_s=10.0)


@pytest.mark.slow
@pytest.mark.skipif(torch is None, reason='torch is not installed')
def test_autoattack_real_mode_runs_both_implementations_on_a_converted_checkpoint(tmp_path):
  """--real: a PyTorch CIFAR ResNet-18 checkpoint converted for ours, its exported copy for the original,
  the same points; each requested row, both sides' robust points within one of each other."""
  pytest.importorskip('pyautoattack')
  from tests import torch_reference as tr
  ref = tr.resnet18(num_classes=10, width=4, stem='cifar', seed=7)
  tr.save_plain(ref, str(tmp_path / 'model.pt'))
  x = np.random.RandomState(0).rand(4, 32, 32, 3).astype(np.float32)
  with torch.no_grad():  # labels: the model's own predictions, so that every point starts robust
    y = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).argmax(1).numpy()
  np.savez(tmp_path / 'points.npz', x=x, y=y)
  cmd = [sys.executable, '-m', 'benchmarks.autoattack_speed', f'--real={tmp_path / "model.pt"}',
         f'--points={tmp_path / "points.npz"}', '--num_points=4', '--batch_size=4', '--eps=0.002',
         '--attacks=apgd-ce,apgd-t', '--nohost_flags']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {line.split('|')[1].strip(): line.split('|') for line in proc.stdout.splitlines()
          if line.startswith('| apgd')}
  assert set(rows) == {'apgd-ce', 'apgd-t'}, proc.stdout
  for cells in rows.values():
    ours, theirs = (int(cells[i].split('/')[0]) for i in (2, 3))
    assert abs(ours - theirs) <= 1 and cells[2].strip().endswith('/4'), proc.stdout
