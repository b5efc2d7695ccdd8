"""comparison.png and sensitivity.png."""

from __future__ import annotations

from typing import List

import numpy as np

from autolora_jax import reporting
from autolora_jax.compare.plan import AUTO_METHOD, METHOD_NAMES, SWEEP_METHOD, number_label
from autolora_jax.compare.summary import CHECKPOINTS, METRIC_NAMES, METRICS, grid_metrics


def plot_comparison(summary: dict, path: str) -> None:
  """comparison.png: per checkpoint (best, final) grouped bars per method of SA, PGD-10 and AA (percent),
  with the std over seeds as error bars."""
  plt = reporting.pyplot()
  names = list(summary['methods'])
  metrics = [k for k in METRICS if any(k in e[c] for e in summary['methods'].values() for c in CHECKPOINTS)]
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.4 * len(names) * 2), 4.5), sharey=True)
  width = 0.8 / max(len(metrics), 1)
  x = np.arange(len(names))
  for ax, checkpoint in zip(axes, CHECKPOINTS):
    for j, k in enumerate(metrics):
      stats = [summary['methods'][m][checkpoint].get(k) for m in names]
      means = [100 * s['mean'] if s else np.nan for s in stats]
      stds = [100 * s['std'] if s else 0.0 for s in stats]
      bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                    label=METRIC_NAMES[k])
      ax.bar_label(bars, labels=[f'{v:.1f}' if np.isfinite(v) else '' for v in means], fontsize=7,
                   padding=2)
    ax.set_xticks(x, [f'{METHOD_NAMES.get(m, m)}\n(n={summary["methods"][m]["n"]})' for m in names])
    ax.set(title=f'{checkpoint} checkpoint', ylabel='test accuracy (%)')
    ax.grid(alpha=0.3, axis='y')
    ax.legend()
  fig.suptitle(f'{summary.get("dataset", "")}: test accuracy, mean ± std over seeds')
  reporting.save_figure(fig, plt, path)


def sensitivity_series(sweep: dict, metric: str) -> List[dict]:
  """What sensitivity.png draws for one metric: the series of best-checkpoint test accuracy (percent) against
  the learning rate, one per method (vanilla RFT: one per KL weight l2 of the grid, over config.fixed.lr;
  AutoLoRa: over its initial learning rate config.auto_lr.lr0), each {'method', 'label', 'lr', 'mean', 'std'}
  over the points that have the metric."""
  series = []
  points = {(p['lr'], p['l2']): p for p in sweep['grid']}
  for l2 in sweep['l2s']:
    stats = [(lr, (points.get((lr, l2)) or {}).get('best', {}).get(metric)) for lr in sweep['lrs']]
    stats = [(lr, s) for lr, s in stats if s and s['mean'] is not None]
    if stats:
      label = f'{METHOD_NAMES.get(SWEEP_METHOD, SWEEP_METHOD)} (lr), l2 = {number_label(l2)}'
      series.append({'method': SWEEP_METHOD, 'label': label, 'lr': [lr for lr, _ in stats],
                     'mean': [100 * s['mean'] for _, s in stats], 'std': [100 * s['std'] for _, s in stats]})
  rows = [(r['lr0'], r['best'].get(metric)) for r in sweep.get('autolora_lr0') or []]
  rows = [(lr, s) for lr, s in rows if s and s['mean'] is not None]
  if rows:
    series.append({'method': AUTO_METHOD, 'label': f'{METHOD_NAMES.get(AUTO_METHOD, AUTO_METHOD)} (lr0)',
                   'lr': [lr for lr, _ in rows], 'mean': [100 * s['mean'] for _, s in rows],
                   'std': [100 * s['std'] for _, s in rows]})
  return series


def plot_sensitivity(sweep: dict, path: str) -> None:
  """sensitivity.png: per robust metric (PGD-10, AA if present) the best-checkpoint test accuracy against the
  learning rate (log axis), one series per method (`sensitivity_series`; std over seeds as error bars), and
  AutoLoRa's run at the config's lr0 as a horizontal line when the sweep has no lr0 series."""
  plt = reporting.pyplot()
  metrics = grid_metrics(sweep) or ['pgd10']
  fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
  a = sweep.get('autolora')
  for ax, k in zip(axes[0], metrics):
    series = sensitivity_series(sweep, k)
    for s in series:
      auto = s['method'] == AUTO_METHOD
      ax.errorbar(s['lr'], s['mean'], yerr=s['std'], capsize=3, marker='s' if auto else 'o', lw=2.5 if auto else 1.2,
                  color='black' if auto else None, label=s['label'])
    stat = a['best'].get(k) if a else None
    if stat and stat['mean'] is not None and not any(s['method'] == AUTO_METHOD for s in series):
      m, sd = 100 * stat['mean'], 100 * stat['std']
      ax.axhline(m, color='black', lw=1.5, label=f'AutoLoRa: {m:.2f} ± {sd:.2f} (n={a["n"]})')
      if sd > 0:
        ax.axhspan(m - sd, m + sd, color='black', alpha=0.12)
    lrs = sorted({lr for s in series for lr in s['lr']})
    ax.set_xscale('log')
    if lrs:
      ax.set_xticks(lrs, [number_label(v) for v in lrs])
      ax.minorticks_off()
    ax.set(title=f'{METRIC_NAMES[k]} test accuracy, best checkpoint',
           xlabel='learning rate (vanilla RFT: config.fixed.lr; AutoLoRa: config.auto_lr.lr0)', ylabel='accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  reporting.save_figure(fig, plt, path)
