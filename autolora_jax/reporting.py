"""What a run writes for people: metrics.jsonl, TensorBoard events, curves.png, results.json and tables.

Only the host loop calls these (and, on a multi-host run, only process 0).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence

METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
CURVES_FILE = 'curves.png'


def _atomic_write(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class MetricsLog:
  """One JSON object per line in workdir/metrics.jsonl, one line per epoch (epoch 0: before training)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, METRICS_FILE)

  def read(self) -> List[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate(self, last_epoch: int) -> List[dict]:
    """Drops the lines of epochs after `last_epoch` (a resumed run rewrites them); returns those kept."""
    kept = [r for r in self.read() if r['epoch'] <= last_epoch]
    _atomic_write(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
    return kept

  def append(self, record: dict) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


class TensorBoard:
  """Scalars into TensorBoard event files under workdir/tensorboard (a no-op writer when disabled)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.writer = None
    if enabled:
      from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
      self.writer = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    if self.writer is None:
      return
    for name, value in values.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self.writer.scalar(name, value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display), imported when a figure is drawn."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, plt, path: str) -> None:
  """Writes `fig` to the PNG `path` atomically (a reader never sees half a file) and closes it."""
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def plot_curves(records: Sequence[dict], path: str) -> None:
  """curves.png: validation accuracies, learning rate and loss scalars against the epoch."""
  plt = pyplot()

  records = [r for r in records if 'val_pgd10' in r]
  if not records:
    return
  epochs = [r['epoch'] for r in records]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key, label in (('val_clean_adv', 'clean, adversarial branch'), ('val_clean_nat', 'clean, natural branch'),
                     ('val_pgd10', 'PGD-10, adversarial branch')):
    axes[0].plot(epochs, [r[key] for r in records], marker='o', label=label)
  reloads = [r['epoch'] for r in records if r.get('reload_best')]
  for e in reloads:
    axes[0].axvline(e, color='grey', ls=':', lw=1)
  axes[0].set(title='validation accuracy' + (' (dotted: lr halved, best reloaded)' if reloads else ''),
              xlabel='epoch', ylabel='accuracy')
  axes[0].legend()
  axes[1].plot(epochs, [r['lr'] for r in records], marker='o')
  axes[1].set(title='learning rate (used in the epoch)', xlabel='epoch', yscale='log')
  axes[2].plot(epochs, [r['l1'] for r in records], marker='o', label='l1')
  axes[2].plot(epochs, [r['l2'] for r in records], marker='o', label='l2')
  axes[2].set(title='loss scalars (used in the epoch)', xlabel='epoch')
  axes[2].legend()
  for ax in axes:
    ax.grid(alpha=0.3)
  save_figure(fig, plt, path)


def write_results(workdir: str, results: dict) -> str:
  """results.json, e.g. {"best": {"epoch": E, "test": {"clean": a, "pgd10": b}}, "final": {...}}."""
  path = os.path.join(workdir, RESULTS_FILE)
  _atomic_write(path, json.dumps(results, indent=2) + '\n')
  return path


def results_table(results: dict) -> str:
  """A plain-text table of the test accuracies (percent) of each evaluated checkpoint."""
  rows = {name: entry for name, entry in results.items() if isinstance(entry, dict) and 'test' in entry}
  metrics: List[str] = []
  for entry in rows.values():
    metrics += [m for m, v in entry['test'].items() if isinstance(v, (int, float)) and m not in metrics]
  widths = [max(len(m) + 2, 9) for m in metrics]
  header = f"{'checkpoint':<12}{'epoch':>6}" + ''.join(f'{m:>{w}}' for m, w in zip(metrics, widths))
  lines = [header, '-' * len(header)]
  for name, entry in rows.items():
    cells = ''.join(f"{100 * entry['test'][m]:>{w - 1}.2f}%" if m in entry['test'] else ' ' * w
                    for m, w in zip(metrics, widths))
    lines.append(f"{name:<12}{entry.get('epoch', ''):>6}{cells}")
  return '\n'.join(lines)
