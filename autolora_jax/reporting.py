"""What a run writes for people: metrics.jsonl, TensorBoard events, curves.png, results.json and tables.

Only the host loop calls these (and, on a multi-host run, only process 0).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Dict, List, Sequence

METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
RESULTS_CARD = 'results.md'
CURVES_FILE = 'curves.png'


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file: a reader sees the old file or the new one whole."""
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
    atomic_write(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
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


# How curves.png draws each kind of decision on the validation PGD-10 curve: (marker, colour, legend text).
MARK_STYLES = {'halve': ('v', 'tab:red', 'lr halved (automatic schedule)'),
               'lr_step': ('v', 'tab:orange', 'lr changed (fixed schedule)'),
               'reload': ('o', 'tab:purple', 'best checkpoint reloaded'),
               'stop': ('X', 'black', 'stop')}


def decision_marks(records: Sequence[dict]) -> List[dict]:
  """The policy's decisions that metrics.jsonl records, as curves.png marks them: one dict per decision with
  'epoch' (after which it was taken), 'kind' ('halve', 'lr_step', 'reload', 'stop', or 'lr0_pick' for the
  probe of lr0='auto' before epoch 1), 'value' (the epoch's validation PGD-10 accuracy, where the mark sits;
  None for 'lr0_pick') and 'label'.

  Read from each epoch's record: 'lr' and 'next_lr' (the rate of the epoch and of the next one), 'condition'
  (the automatic schedule's condition that halved it, 0 if none), 'reload_best' and 'best_epoch' (the reload
  and the epoch reloaded; 'reload_failed' if the best checkpoint could not be read), 'stop'; and epoch 0's
  'lr0_probe'.
  """
  marks = []
  for r in records:
    probe = r.get('lr0_probe')
    if r.get('epoch') == 0 and probe:
      scores = ', '.join(f'{c:g}: ' + ('diverged' if v is None else f'{100 * v:.1f}')
                         for c, v in zip(probe['candidates'], probe['val_pgd10']))
      marks.append({'epoch': 0, 'kind': 'lr0_pick', 'value': None,
                    'label': f"lr0 {probe['pick']:g} picked by the probe (val. PGD-10 %: {scores})"})
    if 'val_pgd10' not in r:
      continue
    e, value, lr, next_lr = r['epoch'], r['val_pgd10'], r.get('lr'), r.get('next_lr')
    if r.get('condition'):
      marks.append({'epoch': e, 'kind': 'halve', 'value': value,
                    'label': f"lr {lr:g} -> {next_lr:g} (condition {r['condition']})"})
    elif lr is not None and next_lr is not None and next_lr != lr and not r.get('stop'):
      marks.append({'epoch': e, 'kind': 'lr_step', 'value': value, 'label': f'lr {lr:g} -> {next_lr:g}'})
    if r.get('reload_best') and not r.get('reload_failed'):
      marks.append({'epoch': e, 'kind': 'reload', 'value': value,
                    'label': f"best of epoch {r.get('best_epoch')} reloaded"})
    if r.get('stop'):
      marks.append({'epoch': e, 'kind': 'stop', 'value': value, 'label': f'stop after epoch {e}'})
  return marks


VALIDATION_KEYS = ('val_clean_adv', 'val_clean_nat', 'val_pgd10')  # every epoch's; the schedule follows val_pgd10


def validation_attack_keys(records: Sequence[dict]) -> List[str]:
  """The val_<attack> keys of config.eval.val_attacks that `records` (metrics.jsonl) hold, in order."""
  keys = []
  for r in records:
    keys += [k for k in r if k.startswith('val_') and k not in VALIDATION_KEYS and k not in keys]
  return keys


def plot_curves(records: Sequence[dict], path: str) -> None:
  """curves.png: validation accuracies (with the policy's decisions, `decision_marks`, on the PGD-10 curve),
  learning rate and loss scalars against the epoch."""
  plt = pyplot()

  marks = decision_marks(records)
  records = [r for r in records if 'val_pgd10' in r]
  if not records:
    return
  epochs = [r['epoch'] for r in records]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key, label in (('val_clean_adv', 'clean, adversarial branch'), ('val_clean_nat', 'clean, natural branch'),
                     ('val_pgd10', 'PGD-10, adversarial branch')):
    axes[0].plot(epochs, [r[key] for r in records], marker='o', label=label)
  for key in validation_attack_keys(records):  # config.eval.val_attacks: recorded, not followed
    axes[0].plot(epochs, [r.get(key, float('nan')) for r in records], marker='.', ls='--',
                 label=f'{key[4:].replace("_", "-").upper()} (recorded)')
  for kind, (marker, colour, text) in MARK_STYLES.items():
    at = [m for m in marks if m['kind'] == kind]
    if at:
      axes[0].scatter([m['epoch'] for m in at], [m['value'] for m in at], marker=marker, s=110, zorder=3,
                      facecolors='none' if kind == 'reload' else colour, edgecolors=colour, linewidths=1.5,
                      label=text)
  for m in marks:
    if m['kind'] == 'reload':
      axes[0].axvline(m['epoch'], color=MARK_STYLES['reload'][1], ls=':', lw=1)
  pick = [m['label'] for m in marks if m['kind'] == 'lr0_pick']
  axes[0].set(xlabel='epoch', ylabel='accuracy')
  # The probe's pick (a long line) wrapped to the panel's width, smaller than the title.
  axes[0].set_title('validation accuracy' + ('\n' + textwrap.fill(pick[0], 70) if pick else ''),
                    fontsize=9 if pick else None)
  axes[0].legend(fontsize=8)
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
  """results.json, e.g. {"best": {"epoch": E, "test": {"clean": a, "pgd10": b}}, "final": {...}}, and the
  card results.md beside it (`results_card`)."""
  path = os.path.join(workdir, RESULTS_FILE)
  atomic_write(path, json.dumps(results, indent=2) + '\n')
  atomic_write(os.path.join(workdir, RESULTS_CARD), results_card(results))
  return path


def _pct(value) -> str:
  return f'{100 * value:.2f}' if isinstance(value, (int, float)) and math.isfinite(value) else '–'


def _duration(seconds) -> str:
  if not isinstance(seconds, (int, float)):
    return '–'
  return f'{seconds:.1f} s' if seconds < 120 else f'{seconds / 60:.1f} min'


# results.json's test metrics in the card's order, with their column names.
CARD_COLUMNS = (('clean', 'clean'), ('pgd10', 'PGD-10'), ('autoattack', 'AutoAttack'),
                ('clean_autoattack_points', 'clean (AA points)'), ('pgd10_autoattack_points', 'PGD-10 (AA points)'),
                ('corruption_mean', 'corruptions (mean)'), ('clean_nat_branch', 'clean, natural branch'))


def results_card(results: dict) -> str:
  """results.md: what the run is (method, architecture, data set, threat model, AutoAttack's setting), the
  test numbers of its checkpoints (percent), its wall times and the command that reproduces it."""
  aa = results.get('autoattack') or {}
  tm = results.get('threat_model') or {}
  rows = [(name, entry) for name, entry in results.items() if isinstance(entry, dict) and 'test' in entry]
  columns = [(k, label) for k, label in CARD_COLUMNS if any(k in e['test'] for _, e in rows)]
  shape = results.get('input_shape')
  lines = [f"# {results.get('method', '?')} on {results.get('dataset', '?')} ({results.get('arch', '?')})", '',
           '| | |', '|---|---|',
           f"| method | `{results.get('method', '?')}`"
           + (' (reference_compat)' if results.get('reference_compat') else '') + ' |',
           f"| architecture | `{results.get('arch', '?')}` |",
           f"| data set | `{results.get('dataset', '?')}`, {results.get('num_test', '?')} test points"
           + (f', images {shape[1]} x {shape[2]} x {shape[0]}' if shape else '') + ' |']
  if tm:
    norm = {'linf': 'L-infinity', 'l2': 'L2'}.get(tm.get('norm'), tm.get('norm', '?'))
    lines.append(f"| threat model | {norm} eps {tm.get('eps', float('nan')):.4g}; PGD-10 = "
                 f"{tm.get('eval_steps', 10)} steps of {tm.get('step_size', float('nan')):.4g} |")
  if aa:
    points = aa.get('points', 'first')
    where = (f"all {aa.get('num_test')} test points" if points == 'all' else
             f"{aa.get('num_points')} of {aa.get('num_test')} test points, "
             + ('a class-stratified sample (seed {}; indices in results.json)'.format(aa.get('seed'))
                if points == 'stratified' else 'the first of the split'))
    lines.append(f"| AutoAttack | version {aa.get('version')} ({', '.join(aa.get('attacks', []))}), "
                 f"{aa.get('norm')} eps {aa.get('eps', float('nan')):.4g}, on {where} |")
  lines += ['', '## Test accuracy (%)', '',
            '| checkpoint | epoch | ' + ' | '.join(label for _, label in columns) + ' |',
            '|---|---|' + '---|' * len(columns)]
  for name, entry in rows:
    lines.append(f"| {name} | {entry.get('epoch', '')} | "
                 + ' | '.join(_pct(entry['test'].get(k)) for k, _ in columns) + ' |')
  lines += ['', '## Time', '']
  if 'wall_seconds' in results:
    lines.append(f"- the whole run (training and test): {_duration(results['wall_seconds'])}")
  if 'eval_seconds' in results:
    lines.append(f"- the last test evaluation (--mode=eval): {_duration(results['eval_seconds'])}")
  for name, seconds in (aa.get('seconds') or {}).items():
    lines.append(f'- AutoAttack of the {name} checkpoint: {_duration(seconds)}')
  command = results.get('command')
  lines += ['', '## Reproduce', '']
  if command:
    lines += ['```bash', command, '```']
  else:
    lines.append('`autolora_jax.train.train_and_evaluate(config, workdir)` with the config in config.json.')
  return '\n'.join(lines) + '\n'


# Short column names of the printed table ('corr.': the mean accuracy over the common corruptions).
TABLE_LABELS = {'corruption_mean': 'corr.'}


def results_table(results: dict) -> str:
  """A plain-text table of the test accuracies (percent) of each evaluated checkpoint."""
  rows = {name: entry for name, entry in results.items() if isinstance(entry, dict) and 'test' in entry}
  metrics: List[str] = []
  for entry in rows.values():
    metrics += [m for m, v in entry['test'].items() if isinstance(v, (int, float)) and m not in metrics]
  labels = [TABLE_LABELS.get(m, m) for m in metrics]
  widths = [max(len(m) + 2, 9) for m in labels]
  header = f"{'checkpoint':<12}{'epoch':>6}" + ''.join(f'{m:>{w}}' for m, w in zip(labels, widths))
  lines = [header, '-' * len(header)]
  for name, entry in rows.items():
    cells = ''.join(f"{100 * entry['test'][m]:>{w - 1}.2f}%" if m in entry['test'] else ' ' * w
                    for m, w in zip(metrics, widths))
    lines.append(f"{name:<12}{entry.get('epoch', ''):>6}{cells}")
  return '\n'.join(lines)
