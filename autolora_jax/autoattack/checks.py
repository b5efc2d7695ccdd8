"""Sanity checks before (and after) an AutoAttack evaluation, in the spirit of the original's.

Each check warns (`AutoAttackWarning`) rather than fails: the evaluation still runs, but its number may
overstate the robustness.

* `check_randomized`: repeated calls on the same input differ (a randomised model needs attacks that
  average over the randomness);
* `check_probabilities`: the outputs look like probabilities (softmax) rather than logits, which flattens
  the losses the attacks climb;
* `check_zero_gradients`: some examples have an exactly zero input gradient (of the margin
  z_y - max_{j != y} z_j in `autoattack.run`), e.g. behind a quantising input step: gradient attacks
  cannot move them (gradient masking);
* `check_num_classes`: fewer classes than targeted attacks want targets;
* `check_square`: Square, which uses no gradient, broke points that every gradient attack before it
  missed (a sign of gradient masking).
"""

from __future__ import annotations

import warnings
from typing import Dict, Sequence

import numpy as np


class AutoAttackWarning(UserWarning):
  """A sign that an AutoAttack evaluation may be unreliable for this model."""


def _warn(message: str) -> None:
  warnings.warn(message, AutoAttackWarning, stacklevel=3)


def check_randomized(outputs: Sequence, y, tol: float = 1e-4) -> bool:
  """Warns if repeated evaluations of the model on the same batch differ; returns True if they do.

  Args:
    outputs: the logits (N, K) of two or more calls on the same inputs.
    y: the labels (N,). The calls differ if their L2-normalised logits differ by more than tol, or their
      numbers of correct predictions differ.
  """
  outs = [np.asarray(o, np.float64) for o in outputs]
  outs = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outs]
  diff = max(float(np.max(np.linalg.norm(a - b, axis=-1))) for a in outs for b in outs)
  counts = {int(np.sum(np.argmax(o, -1) == np.asarray(y))) for o in outs}
  if diff > tol or len(counts) > 1:
    _warn(f'The model seems randomised: {len(outs)} calls on the same inputs differ (normalised logits by '
          f'up to {diff:.2e}). AutoAttack assumes a deterministic model; its numbers for a randomised one '
          'are not reliable. Evaluate in inference mode (no dropout, BatchNorm with running statistics).')
    return True
  return False


def check_probabilities(logits, tol: float = 1e-5) -> bool:
  """Warns if the outputs lie in [0, 1] and sum to 1 per row; returns True if they do."""
  logits = np.asarray(logits, np.float64)
  if logits.max() < 1 + tol and logits.min() > -tol and np.all(np.abs(logits.sum(-1) - 1) < tol):
    _warn('The model outputs look like probabilities (in [0, 1], summing to 1), not logits. The attacks '
          'need logits: remove the final softmax from logits_fn.')
    return True
  return False


def check_zero_gradients(zero) -> int:
  """Warns if any example has an all-zero input gradient; `zero` (N,) bool flags them. Returns how many."""
  zero = np.asarray(zero, bool)
  count = int(zero.sum())
  if count:
    _warn(f'{count} of {zero.shape[0]} examples have an exactly zero input gradient: gradient-based attacks '
          '(APGD, FAB) cannot move them, and their robust accuracy may be overstated (gradient masking). '
          'Square, which needs no gradient, is the check: run the standard version.')
  return count


def check_num_classes(num_classes: int, attacks: Sequence[str], n_target_classes: int) -> bool:
  """Warns if a targeted attack asks for more target classes than exist (they are capped at K - 1)."""
  targeted = [a for a in attacks if a in ('apgd-t', 'fab-t')]
  if 'apgd-dlr' in attacks and num_classes < 3:
    _warn(f'APGD-DLR needs at least 3 classes (its DLR loss uses the 3 largest logits); the model has '
          f'{num_classes}, so it is skipped.')
    return True
  if 'apgd-t' in targeted and num_classes < 4:
    _warn(f'APGD-T needs at least 4 classes (its targeted DLR loss uses the 4 largest logits); the model has '
          f'{num_classes}. Use attacks without apgd-t.')
    return True
  if targeted and n_target_classes > num_classes - 1:
    _warn(f'{", ".join(targeted)} asked for {n_target_classes} target classes but the model has only '
          f'{num_classes} classes: using {num_classes - 1}.')
    return True
  return False


def warn_version_norm(version: str, norm: str) -> None:
  """Warns for a version the original tunes for other norms ('plus' is for L-infinity and L2)."""
  _warn(f'The {version!r} version is meant for L-infinity and L2 (as in the original); with norm {norm} '
        'check its settings, or use the standard version.')


def check_square(accuracy: Dict[str, float], tol: float = 0.002) -> bool:
  """Warns if Square lowered the robust accuracy by more than tol after the gradient attacks."""
  names = list(accuracy)
  if 'square' not in names or names.index('square') < 2:
    return False
  before = accuracy[names[names.index('square') - 1]]
  if accuracy['square'] < before - tol:
    drop = before - accuracy['square']
    _warn(f'Square, which uses no gradients, lowered the robust accuracy by {drop:.2%} after'
          ' the gradient-based attacks: their gradients may be masked, and the evaluation may overstate '
          'the robustness. Consider more Square queries or an adaptive attack.')
    return True
  return False
