"""The numbers of a comparison and its tables: per method the mean and spread over seeds of each test
accuracy (`summarize`), per grid point of the sweep the same (`summarize_sweep`), and comparison.md /
sensitivity.md (`markdown`, `sensitivity_markdown`)."""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence

import numpy as np

from autolora_jax import experiment, reporting
from autolora_jax.compare import paper
from autolora_jax.compare.plan import METHOD_NAMES, SWEEP_METHOD, lr0_label, number_label, sweep_label, unique

CHECKPOINTS = ('best', 'final')
METRICS = ('clean', 'pgd10', 'autoattack')
METRIC_NAMES = {'clean': 'SA', 'pgd10': 'PGD-10', 'autoattack': 'AA'}
# Summarised too where runs have them (config.eval.corruptions): the mean accuracy over the common corruptions.
EXTRA_METRICS = ('corruption_mean',)
STD_NOTE = 'sample standard deviation over seeds (ddof=1); 0 for a single seed'


# -- statistics --------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> dict:
  """{'mean', 'std', 'n'} of the values: the sample std (ddof=1) for n > 1, 0 for one value; None when
  there are none."""
  values = [float(v) for v in values]
  if not values:
    return {'mean': None, 'std': None, 'n': 0}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(np.mean(values)), 'std': std, 'n': len(values)}


def _number(x) -> Optional[float]:
  return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def summarize(results_by_method_seed: Mapping[str, Mapping[int, dict]]) -> dict:
  """Per method: each seed's raw numbers and their mean and std over seeds.

  Args:
    results_by_method_seed: {method: {seed: results dict (results.json's layout)}}.

  Returns:
    {'std': STD_NOTE, 'methods': {method: {'n': seeds, 'seeds': [...], 'runs': {'<seed>': {'best':
    {'clean', 'pgd10'[, 'autoattack']}, 'final': {...}, 'best_epoch', 'final_epoch', 'wall_seconds'}},
    'best': {metric: {'mean', 'std', 'n'}}, 'final': {...}, 'wall_seconds': {'mean', 'std', 'n'}}}}, with
    accuracies as fractions; a metric no seed has (AutoAttack disabled) is left out of 'best'/'final'.
  """
  out = {}
  for method, by_seed in results_by_method_seed.items():
    seeds = sorted(by_seed)
    runs = {}
    for seed in seeds:
      results = by_seed[seed]
      run = {}
      for name in CHECKPOINTS:
        entry = results.get(name) or {}
        test = entry.get('test') or {}
        run[name] = {k: _number(test[k]) for k in METRICS + EXTRA_METRICS if _number(test.get(k)) is not None}
        run[f'{name}_epoch'] = entry.get('epoch')
      run['wall_seconds'] = _number(results.get('wall_seconds'))
      runs[str(seed)] = run
    entry = {'n': len(seeds), 'seeds': seeds, 'runs': runs}
    for name in CHECKPOINTS:
      entry[name] = {}
      for k in METRICS + EXTRA_METRICS:
        values = [r[name][k] for r in runs.values() if k in r[name]]
        if values:
          entry[name][k] = mean_std(values)
    walls = [r['wall_seconds'] for r in runs.values() if r['wall_seconds'] is not None]
    entry['wall_seconds'] = mean_std(walls)
    out[method] = entry
  return {'std': STD_NOTE, 'methods': out}


def summarize_sweep(grid_results: Mapping[str, Mapping[int, dict]], autolora_results: Mapping[int, dict],
                    lrs: Sequence[float], l2s: Sequence[float],
                    lr0_results: Optional[Mapping[float, Mapping[int, dict]]] = None,
                    lr0s: Sequence[float] = ()) -> dict:
  """sensitivity.json: per grid point (lr, l2) vanilla RFT's numbers as `summarize` gives them, AutoLoRa's
  over its seeds at the config's lr0 ('autolora', None without runs), and per initial learning rate lr0 of
  `lr0s` AutoLoRa's ('autolora_lr0': [{'lr0', 'label', ...}], in lr0s's order)."""
  per_point = summarize(grid_results)['methods']
  grid = []
  for lr in lrs:
    for l2 in l2s:
      label = sweep_label(lr, l2)
      if label in per_point:
        grid.append({'lr': float(lr), 'l2': float(l2), 'label': label, **per_point[label]})
  autolora = summarize({'autolora': autolora_results})['methods']['autolora'] if autolora_results else None
  per_lr0 = summarize({float(v): r for v, r in (lr0_results or {}).items() if r})['methods']
  rows = [{'lr0': float(v), 'label': lr0_label(v), **per_lr0[float(v)]} for v in lr0s if float(v) in per_lr0]
  return {'std': STD_NOTE, 'method': SWEEP_METHOD, 'lrs': [float(v) for v in lrs],
          'l2s': [float(v) for v in l2s], 'grid': grid, 'autolora': autolora,
          'lr0s': [float(v) for v in lr0s], 'autolora_lr0': rows}


def budget(results_by_seed: Mapping[int, dict], search_by_seed: Optional[Mapping[int, Sequence[dict]]] = None) -> dict:
  """The compute behind a method's numbers, per seed: its run (with the lr0 probe where it had one) and the
  runs of the search that chose its hyper-parameters (`search_by_seed`: e.g. vanilla RFT's sensitivity grid).

  Returns {'runs': {'mean', 'std', 'n'}, 'wall_seconds': {...} (the runs' wall times added up),
  'probe_seconds': {...} (the lr0 probe's share; n 0 without one), 'search_runs': runs of the search per seed
  (their mean)}.
  """
  runs, walls, probes, search = [], [], [], []
  for seed, results in results_by_seed.items():
    extra = list((search_by_seed or {}).get(seed, ()))
    runs.append(1 + len(extra))
    search.append(len(extra))
    seconds = [_number(r.get('wall_seconds')) for r in [results] + extra]
    if all(t is not None for t in seconds):
      walls.append(sum(seconds))
    probe = _number((results.get('lr0_probe') or {}).get('seconds'))
    if probe is not None:
      probes.append(probe)
  return {'runs': mean_std(runs), 'wall_seconds': mean_std(walls), 'probe_seconds': mean_std(probes),
          'search_runs': float(np.mean(search)) if search else 0.0}


def format_budget(b: Optional[dict]) -> str:
  """The comparison table's compute cell: '1 run + lr0 probe, 5.4 min' / '12 runs (11 of the grid), 48 min'."""
  if not b or not b['runs'].get('n'):
    return '–'
  runs = b['runs']['mean']
  text = f'{runs:g} run' + ('s' if runs != 1 else '')
  if b.get('search_runs'):
    text += f' ({b["search_runs"]:g} of the grid)'
  if b['probe_seconds'].get('n'):
    text += f' incl. lr0 probe ({format_seconds(b["probe_seconds"]["mean"])})'
  wall = b['wall_seconds']
  return text + (f', {format_seconds(wall["mean"])}' if wall.get('n') else '')


def describe_config(config, config_file: str = '', command: str = '') -> dict:
  """What the outputs record about the setting: config file, dataset, architecture, eps, AutoAttack."""
  aa = config.autoattack
  return {'config_file': config_file, 'dataset': config.dataset.name, 'arch': config.model.arch,
          'eps': float(experiment.effective_eps(config)), 'pgd_steps': int(config.attack.eval_steps),
          'reference_compat': bool(config.reference_compat),
          'autoattack': {'enabled': bool(aa.enabled), 'version': aa.version,
                         'num_points': int(aa.num_points), 'points': str(aa.get('points', 'first')),
                         'seed': int(aa.seed)},
          'command': command}


# -- tables ------------------------------------------------------------------------------------------------

def format_pm(stat: Optional[dict], scale: float = 100.0, digits: int = 2) -> str:
  """'mean ± std' of a {'mean', 'std'} (accuracies as percent); '–' when missing."""
  if not stat or stat.get('mean') is None:
    return '–'
  return f'{scale * stat["mean"]:.{digits}f} ± {scale * stat["std"]:.{digits}f}'


def format_seconds(seconds: Optional[float]) -> str:
  """A duration for people: '42 s', '3.5 min', '2.10 h'; '–' when missing."""
  if seconds is None:
    return '–'
  if seconds < 120:
    return f'{seconds:.0f} s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.2f} h'


def _format_wall(stat: dict) -> str:
  if not stat or stat.get('mean') is None:
    return '–'
  m, s = stat['mean'], stat['std']
  unit, div = ('s', 1.0) if m < 120 else ('min', 60.0) if m < 7200 else ('h', 3600.0)
  return f'{m / div:.1f} ± {s / div:.1f} {unit}'


def _triple(stats: Mapping[str, dict]) -> str:
  return ' / '.join(format_pm(stats.get(k)) for k in METRICS)


def _setting_lines(summary: dict) -> List[str]:
  aa = summary.get('autoattack') or {}
  if aa.get('enabled', True):
    points = aa.get('num_points', 0)
    if not points:
      where = 'all test points'
    elif aa.get('points', 'first') == 'stratified':
      where = (f'{points} test points, a class-stratified sample (seed {aa.get("seed", 0)}), the same for every '
               'method and seed')
    else:
      where = f'the first {points} test points'
    aa_text = f'AA: AutoAttack ({aa.get("version", "?")}) on {where}'
  else:
    aa_text = 'AA: not run (config.autoattack.enabled=False)'
  eps = summary.get('eps')
  steps_text = f'{summary["pgd_steps"]} steps' if summary.get('pgd_steps') else 'the configured steps'
  return [f'Data set `{summary.get("dataset", "?")}`, {summary.get("arch", "?")}, config '
          f'`{summary.get("config_file") or "?"}`' + (f', eps {eps:.4f} ({eps * 255:.1f}/255)' if eps else '')
          + '.',
          f'Test accuracy in percent, mean ± std over seeds (std: the {summary.get("std", STD_NOTE)}). '
          'best: the checkpoint with the best validation PGD-10 accuracy; final: the last epoch. SA: clean, '
          f'PGD-10: PGD with {steps_text} (config.attack.eval_steps), {aa_text}. Wall time: per run, of the '
          'call that finished it.']


def markdown(summary: dict) -> str:
  """comparison.md: a table of every method's mean ± std (percent) for the best and final checkpoints,
  the paper's Table 2 beside ours for the paper's data sets, and the command that made it."""
  lines = ['# Comparison of the fine-tuning methods', ''] + _setting_lines(summary) + ['']
  corr = any('corruption_mean' in e[c] for e in summary['methods'].values() for c in CHECKPOINTS)
  lines += ['| method | n seeds | best: SA / PGD-10 / AA | final: SA / PGD-10 / AA | '
            + ('best / final: corruptions (mean) | ' if corr else '') + 'wall time per run | compute per seed |',
            '|---|---|---|---|' + ('---|' if corr else '') + '---|---|']
  for method, e in summary['methods'].items():
    corr_cell = (f'{format_pm(e["best"].get("corruption_mean"))} / {format_pm(e["final"].get("corruption_mean"))} | '
                 if corr else '')
    lines.append(f'| {METHOD_NAMES.get(method, method)} (`{method}`) | {e["n"]} | {_triple(e["best"])} | '
                 f'{_triple(e["final"])} | {corr_cell}{_format_wall(e["wall_seconds"])} | '
                 f'{format_budget(e.get("budget"))} |')
  lines.append('')
  lines += ['Compute per seed: the training runs each number needed and their wall times added up (results.json): '
            f'one run per method, with its lr0 probe where `auto_lr.lr0=auto`; for {METHOD_NAMES.get(SWEEP_METHOD)} '
            'also its runs over the sensitivity grid in this folder (`--sweep`: the search that chooses its lr), '
            'where there are any.', '']
  if corr:
    lines += ['Corruptions (mean): the clean accuracy on the corrupted test split averaged over the common '
              'corruptions and severities of `config.eval` (results.json\'s `corruption_mean`; per corruption: '
              'each run\'s corruptions.png).', '']
  lines += ['Seeds: ' + '; '.join(f'{m}: {", ".join(map(str, e["seeds"]))}'
                                  for m, e in summary['methods'].items()) + '.', '']
  lines += ['Each run\'s card (results.md: its numbers, times and command): ' + '; '.join(
      f'{m}: ' + ', '.join(f'[seed {s}]({m}/seed{s}/{reporting.RESULTS_CARD})' for s in e['seeds'])
      for m, e in summary['methods'].items()) + '.', '']
  table = paper.PAPER_TABLE2.get(summary.get('dataset', ''))
  if table:
    name = paper.PAPER_DATASET_NAMES[summary['dataset']]
    lines += [f'## Beside the paper (Table 2, {name})', '',
              'The paper\'s numbers are for **ResNet-50** FEs (SA / PGD-10 / AA, percent); ours are the '
              f'best checkpoint, mean ± std, with {summary.get("arch", "?")}.', '',
              '| method | ours: SA / PGD-10 / AA | paper (ResNet-50): SA / PGD-10 / AA |', '|---|---|---|']
    order = unique(list(summary['methods']) + [m for m in paper.PAPER_METHODS if m in table])
    for method in order:
      ours = summary['methods'].get(method)
      theirs = table.get(method)
      lines.append(f'| {METHOD_NAMES.get(method, method)} | {_triple(ours["best"]) if ours else "–"} | '
                   f'{" / ".join(f"{v:.2f}" for v in theirs) if theirs else "–"} |')
    lines.append('')
  if summary.get('command'):
    lines += ['Made by:', '', '    ' + summary['command'], '']
  return '\n'.join(lines)


def grid_metrics(sweep: dict) -> List[str]:
  """The robust metrics the sweep has (PGD-10, and AA where any grid point or lr0 run has it)."""
  points = list(sweep['grid']) + list(sweep.get('autolora_lr0') or [])
  return [k for k in ('pgd10', 'autoattack') if any(k in p['best'] for p in points)]


def _spread(values: Sequence[float]) -> str:
  return f'{100 * min(values):.2f} to {100 * max(values):.2f} (spread {100 * (max(values) - min(values)):.2f} points)'


def sensitivity_markdown(sweep: dict) -> str:
  """sensitivity.md: vanilla RFT's best-checkpoint test accuracy over the (lr, l2) grid (rows lr, columns
  l2), for PGD-10, AA and SA, beside AutoLoRa's."""
  lines = ['# Sensitivity to the learning rate: vanilla RFT and AutoLoRa', ''] + _setting_lines(sweep) + ['']
  lines += ['Vanilla RFT (`config.method=vanilla_rft`) with `config.fixed.lr` (rows) and `config.fixed.l2` '
            '(the KL weight, columns); the other settings as in `config.fixed`. Best checkpoint, percent, '
            'mean ± std over seeds.', '']
  points = {(p['lr'], p['l2']): p for p in sweep['grid']}
  a = sweep.get('autolora')
  for k in grid_metrics(sweep) + ['clean']:
    lines += [f'## {METRIC_NAMES[k]}', '',
              '| lr \\ l2 | ' + ' | '.join(number_label(v) for v in sweep['l2s']) + ' |',
              '|---|' + '---|' * len(sweep['l2s'])]
    for lr in sweep['lrs']:
      cells = [format_pm((points.get((lr, l2)) or {}).get('best', {}).get(k)) for l2 in sweep['l2s']]
      lines.append(f'| {number_label(lr)} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    values = [p['best'][k]['mean'] for p in sweep['grid'] if k in p['best']]
    if values:
      lines.append(f'Vanilla RFT over the grid: {_spread(values)}.')
    if a:
      lines.append(f'AutoLoRa (no lr or KL weight to choose; {a["n"]} seed{"s" if a["n"] != 1 else ""}): '
                   f'{format_pm(a["best"].get(k))}.')
    rows = sweep.get('autolora_lr0') or []
    if rows:
      lines += ['', 'AutoLoRa over its initial learning rate (`config.auto_lr.lr0`; its schedule sets the rest):', '',
                '| lr0 | ' + ' | '.join(number_label(r['lr0']) for r in rows) + ' |',
                '|---|' + '---|' * len(rows),
                f'| {METRIC_NAMES[k]} | ' + ' | '.join(format_pm(r['best'].get(k)) for r in rows) + ' |', '']
      values = [r['best'][k]['mean'] for r in rows if k in r['best']]
      if values:
        lines.append(f'AutoLoRa over lr0: {_spread(values)}.')
    lines.append('')
  if sweep.get('command'):
    lines += ['Made by:', '', '    ' + sweep['command'], '']
  return '\n'.join(lines)
