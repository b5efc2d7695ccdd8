"""The exported model checked by the original AutoAttack (PyTorch, PyPI `pyautoattack`) beside ours.

`crosscheck(run, model_pt, n)` attacks n test points of the run (chosen as its own AutoAttack chooses them,
`api.Run.test_points`) twice, with the same attacks, norm,
eps, seed and settings: autolora-jax's JAX AutoAttack on the JAX model, and the original on the exported
TorchScript program. The original has no 'fast' version: it runs as version='custom' with our cascade's
attack list, and every attack's settings (restarts, target classes, queries, ...) set to what ours ran
with, the targeted attacks' target count capped at K - 1 classes as ours is.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np

from autolora_jax.export import ExportError, import_torch

PYAUTOATTACK_INSTALL = 'pip install pyautoattack'


def import_original():
  """The original AutoAttack class, or an ExportError saying how to install it."""
  try:
    from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ExportError('The cross-check runs the original PyTorch AutoAttack, which is not installed (an '
                      f'optional dependency): install it with `{PYAUTOATTACK_INSTALL}` (it needs PyTorch) and '
                      'run the command again, or leave out --check.') from None
  return AutoAttack


def configure_original(aa, settings: dict, num_classes: int) -> None:
  """Sets the original's attack objects to the settings each of our attacks ran with
  (`AutoAttackResult.settings`), the target classes capped at num_classes - 1 as ours are."""
  aa.apgd.n_restarts = 1
  aa.fab.n_restarts = 1
  aa.apgd_targeted.n_restarts = 1
  for name, s in settings.items():
    if name in ('apgd-ce', 'apgd-dlr'):
      target = aa.apgd
    elif name == 'apgd-t':
      target = aa.apgd_targeted
    elif name in ('fab', 'fab-t'):
      target = aa.fab
    elif name == 'square':
      target = aa.square
    else:
      continue
    for key in ('n_restarts', 'n_target_classes', 'n_queries', 'eot_iter', 'use_largereps', 'n_iter', 'rho',
                'p_init', 'alpha_max', 'eta', 'beta'):
      if key in s and hasattr(target, key):
        value = s[key]
        if key == 'n_target_classes':
          value = min(int(value), num_classes - 1)
        setattr(target, key, type(getattr(target, key))(value) if getattr(target, key) is not None else value)


def run_original(model_pt: str, x: np.ndarray, y: np.ndarray, *, eps: float, norm: str, attacks,
                 settings: dict, seed: int, batch_size: int) -> dict:
  """The original AutoAttack on the TorchScript program at `model_pt`: per-point robustness and wall time.

  x: NHWC float32 images in [0, 1]; y: labels.
  """
  torch = import_torch()
  AutoAttack = import_original()  # pylint: disable=invalid-name
  model = torch.jit.load(model_pt).eval()
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(np.asarray(y, np.int64))
  aa = AutoAttack(model, norm=norm, eps=float(eps), version='custom', attacks=list(attacks), seed=seed)
  aa.verbose = False
  with torch.no_grad():
    num_classes = int(model(xt[:1]).shape[1])
  configure_original(aa, settings, num_classes)
  start = time.time()
  adv = aa.run_standard_evaluation(xt, yt, batch_size=batch_size)
  adv = adv[0] if isinstance(adv, tuple) else adv
  seconds = time.time() - start
  with torch.no_grad():
    clean = (model(xt).argmax(1) == yt).numpy()
    robust = (model(adv).argmax(1) == yt).numpy() & clean
  return {'robust': robust, 'clean': clean, 'seconds': seconds}


def crosscheck(run, model_pt: str, n: int, out: Optional[str] = None, batch_size: Optional[int] = None,
               progress: bool = True) -> dict:
  """Both AutoAttacks on n test points of an `api.Run` (`Run.test_points(n)`; see the module docstring).

  Returns (and writes to out/crosscheck.json when `out` is given): the settings, each side's robust
  accuracy, per-point robustness and wall time, and the per-point agreement.
  """
  import_original()  # before anything expensive
  from autolora_jax import autoattack  # pylint: disable=g-import-not-at-top
  c = run.config.autoattack
  version = str(c.version)
  attacks = tuple(c.get('attacks', ())) if version == 'custom' else None
  batch_size = int(batch_size or c.batch_size)
  seed = int(c.seed)
  x, y, index = run.test_points(n, with_index=True)
  start = time.time()
  ours = autoattack.run(run.logits_fn, x, y, eps=run.eps, norm=run.norm, version=version, seed=seed,
                        batch_size=batch_size, attacks=attacks, point_index=index, progress=progress,
                        desc='AA (autolora-jax)')
  ours_seconds = time.time() - start
  attack_list = list(ours.attacks)
  original = run_original(model_pt, x, y, eps=run.eps, norm=run.norm, attacks=attack_list,
                          settings=ours.settings, seed=seed, batch_size=batch_size)
  report = {
      'num_points': int(len(y)), 'points': points_text(run, len(y)), 'eps': run.eps, 'norm': run.norm,
      'version': version, 'attacks': attack_list, 'seed': seed, 'batch_size': batch_size,
      'settings': {k: capped(v, run.num_classes) for k, v in ours.settings.items()},
      'ours': {'robust_accuracy': float(np.mean(ours.robust)), 'clean_accuracy': float(np.mean(ours.clean)),
               'seconds': ours_seconds, 'robust': ours.robust.astype(bool).tolist()},
      'original': {'robust_accuracy': float(np.mean(original['robust'])),
                   'clean_accuracy': float(np.mean(original['clean'])), 'seconds': original['seconds'],
                   'robust': original['robust'].astype(bool).tolist()},
      'agreement': int(np.sum(ours.robust.astype(bool) == original['robust'])),
      'clean_agreement': int(np.sum(ours.clean.astype(bool) == original['clean'])),
  }
  report['difference_points'] = 100 * (report['original']['robust_accuracy'] - report['ours']['robust_accuracy'])
  if out is not None:
    path = os.path.join(out, 'crosscheck.json')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(_json_ready(report), f, indent=2)
      f.write('\n')
    os.replace(tmp, path)
  return report


def points_text(run, n: int) -> str:
  """Which test points the check attacked, in words."""
  c = run.config.autoattack
  if str(c.get('points', 'first')) == 'stratified':
    return f'{n} test points, a class-stratified sample (seed {int(c.seed)}), as the run\'s AutoAttack draws them'
  return f'the first {n} test points'


def capped(settings: dict, num_classes: int) -> dict:
  """An attack's settings with its target count as run: at most num_classes - 1."""
  out = dict(settings)
  if 'n_target_classes' in out:
    out['n_target_classes'] = min(int(out['n_target_classes']), num_classes - 1)
  return out


def _json_ready(value):
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value
