"""comparison.png and sensitivity.png."""

from __future__ import annotations

import numpy as np

from autolora_jax import reporting
from autolora_jax.compare.plan import METHOD_NAMES, number_label
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


def plot_sensitivity(sweep: dict, path: str) -> None:
  """sensitivity.png: per robust metric (PGD-10, AA if present) vanilla RFT's best-checkpoint test accuracy
  as bars grouped by lr, one bar per l2 (std over seeds as error bars), and AutoLoRa's mean over its seeds
  as a horizontal line with a band of ± its std."""
  plt = reporting.pyplot()
  metrics = grid_metrics(sweep) or ['pgd10']
  points = {(p['lr'], p['l2']): p for p in sweep['grid']}
  lrs, l2s = sweep['lrs'], sweep['l2s']
  panel_width = max(5.0, 0.5 * len(lrs) * len(l2s) + 2.5)
  fig, axes = plt.subplots(1, len(metrics), figsize=(panel_width * len(metrics), 4.5), squeeze=False)
  width = 0.8 / len(l2s)
  x = np.arange(len(lrs))
  a = sweep.get('autolora')
  for ax, k in zip(axes[0], metrics):
    for j, l2 in enumerate(l2s):
      stats = [(points.get((lr, l2)) or {}).get('best', {}).get(k) for lr in lrs]
      means = [100 * s['mean'] if s else np.nan for s in stats]
      stds = [100 * s['std'] if s else 0.0 for s in stats]
      ax.bar(x + (j - (len(l2s) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
             label=f'vanilla RFT, l2 = {number_label(l2)}')
    stat = a['best'].get(k) if a else None
    if stat and stat['mean'] is not None:
      m, s = 100 * stat['mean'], 100 * stat['std']
      ax.axhline(m, color='black', lw=1.5, label=f'AutoLoRa: {m:.2f} ± {s:.2f} (n={a["n"]})')
      if s > 0:
        ax.axhspan(m - s, m + s, color='black', alpha=0.12)
    ax.set_xticks(x, [number_label(v) for v in lrs])
    ax.set(title=f'{METRIC_NAMES[k]} test accuracy, best checkpoint', xlabel='vanilla RFT learning rate '
           '(config.fixed.lr)', ylabel='accuracy (%)')
    ax.grid(alpha=0.3, axis='y')
    ax.legend(fontsize=8)
  reporting.save_figure(fig, plt, path)
