"""Compares the fine-tuning methods over seeds, and vanilla RFT's sensitivity to its hyper-parameters.

    python -m autolora_jax.compare --config=configs/demo.py --methods=autolora,vanilla_rft,pgd_at \
        --seeds=0,1,2 --workdir=DIR [--config.KEY=VALUE ...]
    python -m autolora_jax.compare --config=configs/demo.py --sweep --seeds=0 --workdir=DIR
    autolora-compare --config=demo --seeds=0 --workdir=DIR   # the installed command: configs by name

Why: the paper's claim is that AutoLoRa matches or beats vanilla RFT without a hyper-parameter search. One
run says little (robust accuracy moves by a point or more between seeds), so the comparison runs every
method with several seeds and reports the mean and the spread; the sweep shows how much vanilla RFT depends
on its learning rate and KL weight, against AutoLoRa, which has neither to tune.

What: every (method, seed) is an ordinary run (`train.train_and_evaluate`) of a copy of the config with
`config.method` and `config.seed` set, in its own workdir DIR/<method>/seed<k>; the sweep's vanilla RFT runs
(`config.fixed.lr`, `config.fixed.l2`) live in DIR/sweep/lr<lr>_l2<l2>/seed<k> and its AutoLoRa runs are the
comparison's DIR/autolora/seed<k>. All of them share `config.pretrain.cache_dir = DIR/pretrain`, so every
method and seed starts from the same pre-trained FE. A run whose results.json holds its test numbers is
skipped (its numbers are read); an unfinished one resumes, since calling `train_and_evaluate` on its
workdir again resumes it. So running the same command again after any stop continues where it stopped.

Outputs in DIR: comparison.json / .md / .png (per method: each seed's test SA, PGD-10 and AutoAttack of the
best and the final checkpoint, their mean and sample standard deviation over seeds, the wall time per run)
and, with --sweep, sensitivity.json / .md / .png. The pure pieces (`summarize`, `markdown`,
`plot_comparison`, `summarize_sweep`, `sensitivity_markdown`, `plot_sensitivity`) and `run_all` /
`run_sweep` (with an injectable `runner`) are importable.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from autolora_jax import config_checks, experiment, models, reporting, steps
from autolora_jax import workdir as workdirs
from autolora_jax.errors import ConfigError, WorkdirError

log = logging.getLogger('autolora_jax.compare')  # also when run as __main__

DEFAULT_METHODS = ('autolora', 'vanilla_rft', 'pgd_at', 'twins')
DEFAULT_SEEDS = (0, 1, 2)  # the comparison's; the sweep's default is one seed, SWEEP_SEEDS
SWEEP_SEEDS = (0,)
SWEEP_LRS = (0.001, 0.003, 0.01, 0.03)
SWEEP_L2S = (0.0, 1.0, 6.0)
SWEEP_METHOD = 'vanilla_rft'
CHECKPOINTS = ('best', 'final')
METRICS = ('clean', 'pgd10', 'autoattack')
METRIC_NAMES = {'clean': 'SA', 'pgd10': 'PGD-10', 'autoattack': 'AA'}
# Summarised too where runs have them (config.eval.corruptions): the mean accuracy over the common corruptions.
EXTRA_METRICS = ('corruption_mean',)
METHOD_NAMES = {'autolora': 'AutoLoRa', 'vanilla_rft': 'vanilla RFT', 'pgd_at': 'PGD-AT', 'twins': 'TWINS'}
STD_NOTE = 'sample standard deviation over seeds (ddof=1); 0 for a single seed'
COMPARISON_FILES = ('comparison.json', 'comparison.md', 'comparison.png')
SENSITIVITY_FILES = ('sensitivity.json', 'sensitivity.md', 'sensitivity.png')
PRETRAIN_DIR = 'pretrain'

# The paper's Table 2 (ResNet-50 FEs; test SA / PGD-10 / AA in percent), as the project's SPEC.md gives it
# (section "Reference numbers (paper, Table 2, ResNet-50; SA / PGD-10 / AA, percent)"). Keyed by
# config.dataset.name and method name.
PAPER_TABLE2 = {
    'cifar10': {'vanilla_rft': (86.33, 56.51, 51.67), 'twins': (86.50, 56.77, 51.73),
                'autolora': (86.93, 57.16, 52.00)},
    'cifar100': {'vanilla_rft': (63.25, 33.25, 28.26), 'twins': (65.52, 33.79, 28.37),
                 'autolora': (66.20, 35.25, 29.50)},
    'dtd': {'vanilla_rft': (52.99, 27.36, 23.35), 'twins': (54.22, 28.94, 23.88),
            'autolora': (53.35, 30.21, 25.59)},
    'stanford_dogs': {'vanilla_rft': (62.68, 24.87, 12.73), 'twins': (63.64, 24.98, 14.41),
                      'autolora': (62.33, 25.32, 17.44)},
    'caltech_birds2011': {'vanilla_rft': (57.27, 28.37, 23.09), 'twins': (63.58, 29.60, 23.71),
                          'autolora': (62.78, 31.07, 24.40)},
    'caltech256': {'vanilla_rft': (66.78, 47.76, 42.17), 'twins': (69.41, 47.79, 42.27),
                   'autolora': (69.85, 47.82, 42.63)},
}
PAPER_DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'dtd': 'DTD',
                       'stanford_dogs': 'Stanford Dogs', 'caltech_birds2011': 'CUB-200',
                       'caltech256': 'Caltech-256'}

Runner = Callable[..., dict]  # train.train_and_evaluate(config, workdir) -> results


# -- inputs ------------------------------------------------------------------------------------------------

def parse_methods(text_or_list) -> List[str]:
  """Method names (a comma list or a sequence), each one of `steps.METHODS`; ConfigError otherwise."""
  names = _split(text_or_list)
  if not names:
    raise ConfigError(f'--methods is empty: give a comma list of methods from {steps.METHODS}, e.g. '
                      '--methods=autolora,vanilla_rft.')
  unknown = [n for n in names if n not in steps.METHODS]
  if unknown:
    raise ConfigError(f'Unknown method{"s" if len(unknown) > 1 else ""} {", ".join(map(repr, unknown))} in '
                      f'--methods: choose from {", ".join(steps.METHODS)} (e.g. '
                      f'--methods={",".join(steps.METHODS)}).')
  return _unique(names)


def parse_seeds(text_or_list) -> List[int]:
  """Seeds (a comma list or a sequence) as non-negative ints; ConfigError otherwise."""
  seeds = []
  for item in _split(text_or_list):
    if isinstance(item, str) and item.isdigit():
      seeds.append(int(item))
    elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and item >= 0:
      seeds.append(int(item))
    else:
      raise ConfigError(f'--seeds takes non-negative whole numbers, e.g. --seeds=0,1,2; got {item!r}.')
  if not seeds:
    raise ConfigError('--seeds is empty: give at least one seed, e.g. --seeds=0,1,2.')
  return _unique(seeds)


def parse_values(text_or_list, flag: str) -> List[float]:
  """Grid values (a comma list or a sequence) as floats; ConfigError naming `flag` otherwise."""
  values = []
  for item in _split(text_or_list):
    try:
      value = float(item)
    except ValueError:
      value = float('nan')
    if not math.isfinite(value):
      raise ConfigError(f'--{flag} takes a comma list of numbers, e.g. --{flag}=0.001,0.01; got {item!r}.')
    values.append(value)
  if not values:
    raise ConfigError(f'--{flag} is empty: give a comma list of numbers.')
  return _unique(values)


def _split(text_or_list) -> list:
  if isinstance(text_or_list, str):
    return [s.strip() for s in text_or_list.split(',') if s.strip()]
  return list(text_or_list)


def _unique(items: Iterable) -> list:
  out = []
  for item in items:
    if item not in out:
      out.append(item)
  return out


def number_label(x: float) -> str:
  """A short label of a grid value for folder names and tables: 0.001 -> '0.001', 6.0 -> '6'."""
  return f'{x:g}'


def sweep_label(lr: float, l2: float) -> str:
  return f'lr{number_label(lr)}_l2{number_label(l2)}'


# -- planning and running ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
  """One run: its group (a method, or a sweep point's label), seed, workdir and config."""
  group: str
  seed: int
  workdir: str
  config: object
  lr: Optional[float] = None  # sweep points only
  l2: Optional[float] = None

  @property
  def name(self) -> str:
    return f'{self.group}/seed{self.seed}'


def run_config(config, workdir: str, method: str, seed: int, **fixed):
  """A copy of `config` for one run: method, seed, the shared FE cache DIR/pretrain, and `config.fixed`
  values (the sweep's lr, l2). The original stays as it was."""
  c = copy.deepcopy(config)  # keeps field references (e.g. config.pretrained following model.arch)
  c.method = method
  c.seed = int(seed)
  c.pretrain.cache_dir = os.path.join(os.path.abspath(workdir), PRETRAIN_DIR)
  for key, value in fixed.items():
    c.fixed[key] = float(value)
  return c


def plan_comparison(config, method_names: Sequence[str], seeds: Sequence[int], workdir: str) -> List[Job]:
  """The runs of the comparison, method by method: DIR/<method>/seed<k>."""
  root = os.path.abspath(workdir)
  return [Job(m, s, os.path.join(root, m, f'seed{s}'), run_config(config, root, m, s))
          for m in method_names for s in seeds]


def plan_sweep(config, lrs: Sequence[float], l2s: Sequence[float], seeds: Sequence[int],
               workdir: str) -> List[Job]:
  """The sweep's vanilla RFT runs over lrs x l2s: DIR/sweep/lr<lr>_l2<l2>/seed<k>."""
  root = os.path.abspath(workdir)
  jobs, labels = [], {}
  for lr in lrs:
    for l2 in l2s:
      label = sweep_label(lr, l2)
      if labels.setdefault(label, (lr, l2)) != (lr, l2):
        raise ConfigError(f'The sweep points (lr, l2) = {labels[label]} and {(lr, l2)} would share the same '
                          f'folder sweep/{label}: give grid values that differ in their first 6 digits.')
      for s in seeds:
        jobs.append(Job(label, s, os.path.join(root, 'sweep', label, f'seed{s}'),
                        run_config(config, root, SWEEP_METHOD, s, lr=lr, l2=l2), lr=lr, l2=l2))
  return jobs


def read_results(workdir: str) -> Optional[dict]:
  """workdir/results.json, or None when it is missing or unreadable (a run stopped while writing it)."""
  path = os.path.join(workdir, reporting.RESULTS_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_finished(results: Optional[dict], autoattack: bool) -> bool:
  """Whether results.json holds the test numbers of the best and the final checkpoint: clean and PGD-10,
  and AutoAttack when the run has it enabled."""
  if not isinstance(results, dict):
    return False
  needed = ('clean', 'pgd10') + (('autoattack',) if autoattack else ())
  for name in CHECKPOINTS:
    test = (results.get(name) or {}).get('test') or {}
    if not all(isinstance(test.get(k), (int, float)) for k in needed):
      return False
  return True


def check_jobs(jobs: Sequence[Job]) -> None:
  """Checks every run before any starts: a valid config (config_checks.validate), and a workdir that is
  empty or holds a run of the same config (a finished run of another config would otherwise be skipped
  and its numbers reported as this config's). Raises ConfigError / WorkdirError."""
  for job in jobs:
    try:
      config_checks.validate(job.config)
    except ConfigError as e:
      raise ConfigError(f'The run {job.name} ({job.workdir}): {e}') from None
    path = os.path.join(job.workdir, workdirs.CONFIG_FILE)
    if not os.path.exists(path):
      continue
    try:
      with open(path) as f:
        old = json.load(f)
      differences = workdirs.config_differences(old, workdirs.config_dict(job.config))
    except (OSError, ValueError) as e:
      differences = [f'{workdirs.CONFIG_FILE} cannot be read ({e})']
    if differences:
      more = len(differences) - 6
      shown = '; '.join(differences[:6]) + (f'; and {more} more' if more > 0 else '')
      raise WorkdirError(
          f'{job.workdir} holds a run of {job.name} with a different config ({shown}). The comparison would '
          'mix two settings: give this comparison another --workdir, or run it with the config that made '
          'that folder.')


def _short(results: dict) -> str:
  parts = []
  for name in CHECKPOINTS:
    test = (results.get(name) or {}).get('test') or {}
    nums = ' / '.join(f'{100 * test[k]:.2f}' for k in METRICS if isinstance(test.get(k), (int, float)))
    parts.append(f'{name} {nums}')
  return ', '.join(parts) + ' (SA / PGD-10' + (' / AA' if _has_aa(results) else '') + ', %)'


def _has_aa(results: dict) -> bool:
  return isinstance(((results.get('best') or {}).get('test') or {}).get('autoattack'), (int, float))


def execute(jobs: Sequence[Job], runner: Runner) -> Dict[Tuple[str, int], dict]:
  """Runs (or skips, or resumes) each job in order; returns {(group, seed): results}.

  A finished run is skipped and its results.json read; any other is handed to `runner(config, workdir)`
  (which resumes it). Results without 'wall_seconds' get this call's own timing. Logs one line per run.
  Exceptions of the runner (InputError, errors.Preempted) propagate: later runs do not start.
  """
  out: Dict[Tuple[str, int], dict] = {}
  total = len(jobs)
  for i, job in enumerate(jobs, start=1):
    where = f'[{i}/{total}] {job.name}'
    results = read_results(job.workdir)
    if is_finished(results, bool(job.config.autoattack.enabled)):
      wall = results.get('wall_seconds')
      log.info('%s: skipped (finished earlier): %s%s', where, _short(results),
               f', {format_seconds(wall)}' if isinstance(wall, (int, float)) else '')
    else:
      resuming = os.path.exists(os.path.join(job.workdir, 'checkpoints'))
      log.info('%s: %s in %s', where, 'resuming' if resuming else 'started', job.workdir)
      start = time.time()
      results = dict(runner(job.config, job.workdir))
      seconds = time.time() - start
      if not isinstance(results.get('wall_seconds'), (int, float)):
        results['wall_seconds'] = seconds
      log.info('%s: %s in %s: %s', where, 'resumed and finished' if resuming else 'finished',
               format_seconds(seconds), _short(results))
    out[(job.group, job.seed)] = results
  return out


def _default_runner() -> Runner:
  from autolora_jax import train  # pylint: disable=g-import-not-at-top (train builds models, data, ...)
  return train.train_and_evaluate


def _group(done: Mapping[Tuple[str, int], dict], jobs: Sequence[Job]) -> Dict[str, Dict[int, dict]]:
  grouped: Dict[str, Dict[int, dict]] = {}
  for job in jobs:
    grouped.setdefault(job.group, {})[job.seed] = done[(job.group, job.seed)]
  return grouped


def run_all(config, method_names: Sequence[str], seeds: Sequence[int], workdir: str,
            runner: Optional[Runner] = None) -> Dict[str, Dict[int, dict]]:
  """Runs (or skips, or resumes) every (method, seed) in DIR/<method>/seed<k>; returns
  {method: {seed: results}}. Methods and seeds are checked, and every run's config and workdir, before
  any run starts."""
  method_names, seeds = parse_methods(method_names), parse_seeds(seeds)
  workdirs.check_writable(os.path.abspath(workdir))
  jobs = plan_comparison(config, method_names, seeds, workdir)
  check_jobs(jobs)
  return _group(execute(jobs, runner or _default_runner()), jobs)


def run_sweep(config, lrs: Sequence[float], l2s: Sequence[float], seeds: Sequence[int], workdir: str,
              runner: Optional[Runner] = None) -> Tuple[Dict[str, Dict[int, dict]], Dict[int, dict]]:
  """The sensitivity study: vanilla RFT over lrs x l2s and AutoLoRa (DIR/autolora/seed<k>, the
  comparison's runs), for `seeds`. Returns ({sweep label: {seed: results}}, {seed: AutoLoRa results})."""
  lrs, l2s = parse_values(lrs, 'sweep_lr'), parse_values(l2s, 'sweep_l2')
  seeds = parse_seeds(seeds)
  workdirs.check_writable(os.path.abspath(workdir))
  sweep_jobs = plan_sweep(config, lrs, l2s, seeds, workdir)
  autolora_jobs = plan_comparison(config, ['autolora'], seeds, workdir)
  check_jobs(sweep_jobs + autolora_jobs)
  done = execute(sweep_jobs + autolora_jobs, runner or _default_runner())
  return _group(done, sweep_jobs), _group(done, autolora_jobs).get('autolora', {})


# -- summaries ---------------------------------------------------------------------------------------------

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


def format_pm(stat: Optional[dict], scale: float = 100.0, digits: int = 2) -> str:
  """'mean ± std' of a {'mean', 'std'} (accuracies as percent); '–' when missing."""
  if not stat or stat.get('mean') is None:
    return '–'
  return f'{scale * stat["mean"]:.{digits}f} ± {scale * stat["std"]:.{digits}f}'


def format_seconds(seconds: Optional[float]) -> str:
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
            + ('best / final: corruptions (mean) | ' if corr else '') + 'wall time per run |',
            '|---|---|---|---|' + ('---|' if corr else '') + '---|']
  for method, e in summary['methods'].items():
    corr_cell = (f'{format_pm(e["best"].get("corruption_mean"))} / {format_pm(e["final"].get("corruption_mean"))} | '
                 if corr else '')
    lines.append(f'| {METHOD_NAMES.get(method, method)} (`{method}`) | {e["n"]} | {_triple(e["best"])} | '
                 f'{_triple(e["final"])} | {corr_cell}{_format_wall(e["wall_seconds"])} |')
  lines.append('')
  if corr:
    lines += ['Corruptions (mean): the clean accuracy on the corrupted test split averaged over the common '
              'corruptions and severities of `config.eval` (results.json\'s `corruption_mean`; per corruption: '
              'each run\'s corruptions.png).', '']
  lines += ['Seeds: ' + '; '.join(f'{m}: {", ".join(map(str, e["seeds"]))}'
                                  for m, e in summary['methods'].items()) + '.', '']
  lines += ['Each run\'s card (results.md: its numbers, times and command): ' + '; '.join(
      f'{m}: ' + ', '.join(f'[seed {s}]({m}/seed{s}/{reporting.RESULTS_CARD})' for s in e['seeds'])
      for m, e in summary['methods'].items()) + '.', '']
  paper = PAPER_TABLE2.get(summary.get('dataset', ''))
  if paper:
    name = PAPER_DATASET_NAMES[summary['dataset']]
    lines += [f'## Beside the paper (Table 2, {name})', '',
              'The paper\'s numbers are for **ResNet-50** FEs (SA / PGD-10 / AA, percent); ours are the '
              f'best checkpoint, mean ± std, with {summary.get("arch", "?")}.', '',
              '| method | ours: SA / PGD-10 / AA | paper (ResNet-50): SA / PGD-10 / AA |', '|---|---|---|']
    order = _unique(list(summary['methods']) + [m for m in ('vanilla_rft', 'twins', 'autolora')
                                                if m in paper])
    for method in order:
      ours = summary['methods'].get(method)
      theirs = paper.get(method)
      lines.append(f'| {METHOD_NAMES.get(method, method)} | {_triple(ours["best"]) if ours else "–"} | '
                   f'{" / ".join(f"{v:.2f}" for v in theirs) if theirs else "–"} |')
    lines.append('')
  if summary.get('command'):
    lines += ['Made by:', '', '    ' + summary['command'], '']
  return '\n'.join(lines)


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


# -- the sensitivity study ---------------------------------------------------------------------------------

def summarize_sweep(grid_results: Mapping[str, Mapping[int, dict]], autolora_results: Mapping[int, dict],
                    lrs: Sequence[float], l2s: Sequence[float]) -> dict:
  """sensitivity.json: per grid point (lr, l2) vanilla RFT's numbers as `summarize` gives them, and
  AutoLoRa's over its seeds (None without runs)."""
  per_point = summarize(grid_results)['methods']
  grid = []
  for lr in lrs:
    for l2 in l2s:
      label = sweep_label(lr, l2)
      if label in per_point:
        grid.append({'lr': float(lr), 'l2': float(l2), 'label': label, **per_point[label]})
  autolora = summarize({'autolora': autolora_results})['methods']['autolora'] if autolora_results else None
  return {'std': STD_NOTE, 'method': SWEEP_METHOD, 'lrs': [float(v) for v in lrs],
          'l2s': [float(v) for v in l2s], 'grid': grid, 'autolora': autolora}


def _grid_metrics(sweep: dict) -> List[str]:
  """The robust metrics the sweep has (PGD-10, and AA where any grid point has it)."""
  return [k for k in ('pgd10', 'autoattack') if any(k in p['best'] for p in sweep['grid'])]


def sensitivity_markdown(sweep: dict) -> str:
  """sensitivity.md: vanilla RFT's best-checkpoint test accuracy over the (lr, l2) grid (rows lr, columns
  l2), for PGD-10, AA and SA, beside AutoLoRa's."""
  lines = ['# Sensitivity of vanilla RFT to its hyper-parameters', ''] + _setting_lines(sweep) + ['']
  lines += ['Vanilla RFT (`config.method=vanilla_rft`) with `config.fixed.lr` (rows) and `config.fixed.l2` '
            '(the KL weight, columns); the other settings as in `config.fixed`. Best checkpoint, percent, '
            'mean ± std over seeds.', '']
  points = {(p['lr'], p['l2']): p for p in sweep['grid']}
  a = sweep.get('autolora')
  for k in _grid_metrics(sweep) + ['clean']:
    lines += [f'## {METRIC_NAMES[k]}', '',
              '| lr \\ l2 | ' + ' | '.join(number_label(v) for v in sweep['l2s']) + ' |',
              '|---|' + '---|' * len(sweep['l2s'])]
    for lr in sweep['lrs']:
      cells = [format_pm((points.get((lr, l2)) or {}).get('best', {}).get(k)) for l2 in sweep['l2s']]
      lines.append(f'| {number_label(lr)} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    values = [p['best'][k]['mean'] for p in sweep['grid'] if k in p['best']]
    if values:
      lines.append(f'Vanilla RFT over the grid: {100 * min(values):.2f} to {100 * max(values):.2f}.')
    if a:
      lines.append(f'AutoLoRa (no lr or KL weight to choose; {a["n"]} seed{"s" if a["n"] != 1 else ""}): '
                   f'{format_pm(a["best"].get(k))}.')
    lines.append('')
  if sweep.get('command'):
    lines += ['Made by:', '', '    ' + sweep['command'], '']
  return '\n'.join(lines)


def plot_sensitivity(sweep: dict, path: str) -> None:
  """sensitivity.png: per robust metric (PGD-10, AA if present) vanilla RFT's best-checkpoint test accuracy
  as bars grouped by lr, one bar per l2 (std over seeds as error bars), and AutoLoRa's mean over its seeds
  as a horizontal line with a band of ± its std."""
  plt = reporting.pyplot()
  metrics = _grid_metrics(sweep) or ['pgd10']
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


# -- writing -----------------------------------------------------------------------------------------------

def _write(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_comparison(summary: dict, workdir: str) -> List[str]:
  """Writes comparison.json, comparison.md and comparison.png into `workdir`; returns their paths."""
  paths = [os.path.join(workdir, n) for n in COMPARISON_FILES]
  _write(paths[0], json.dumps(summary, indent=2) + '\n')
  _write(paths[1], markdown(summary))
  plot_comparison(summary, paths[2])
  return paths


def write_sensitivity(sweep: dict, workdir: str) -> List[str]:
  """Writes sensitivity.json, sensitivity.md and sensitivity.png into `workdir`; returns their paths."""
  paths = [os.path.join(workdir, n) for n in SENSITIVITY_FILES]
  _write(paths[0], json.dumps(sweep, indent=2) + '\n')
  _write(paths[1], sensitivity_markdown(sweep))
  plot_sensitivity(sweep, paths[2])
  return paths


def default_methods(config) -> Tuple[str, ...]:
  """DEFAULT_METHODS, without TWINS for a ViT (TWINS doubles BatchNorms, which a ViT does not have)."""
  if models.is_vit(config.model.arch):
    return tuple(m for m in DEFAULT_METHODS if m != 'twins')
  return DEFAULT_METHODS


def compare(config, workdir: str, *, method_names: Optional[Sequence[str]] = None,
            seeds: Optional[Sequence[int]] = None, sweep: bool = False,
            sweep_lrs: Sequence[float] = SWEEP_LRS, sweep_l2s: Sequence[float] = SWEEP_L2S,
            config_file: str = '', command: str = '', runner: Optional[Runner] = None) -> dict:
  """What the command does: the comparison (when `method_names` is given, or without `sweep`) and the
  sweep (with `sweep`), every run checked before the first starts; writes the outputs into `workdir`.

  Seeds default to DEFAULT_SEEDS for the comparison and SWEEP_SEEDS for a sweep alone. Returns
  {'comparison': summary or None, 'sensitivity': sweep summary or None}.
  """
  if method_names is None and not sweep:
    method_names = default_methods(config)
  method_names = parse_methods(method_names) if method_names is not None else None
  seeds = parse_seeds(seeds if seeds is not None else (DEFAULT_SEEDS if method_names else SWEEP_SEEDS))
  lrs, l2s = parse_values(sweep_lrs, 'sweep_lr'), parse_values(sweep_l2s, 'sweep_l2')
  root = os.path.abspath(os.path.expanduser(workdir or ''))
  if not workdir:
    raise WorkdirError('No workdir given: pass --workdir=DIR, the folder that holds every run and the '
                       'comparison.')
  workdirs.check_writable(root)
  compare_jobs = plan_comparison(config, method_names, seeds, root) if method_names else []
  sweep_jobs, autolora_jobs = [], []
  if sweep:
    sweep_jobs = plan_sweep(config, lrs, l2s, seeds, root)
    have = {(j.group, j.seed) for j in compare_jobs}
    autolora_jobs = [j for j in plan_comparison(config, ['autolora'], seeds, root)
                     if (j.group, j.seed) not in have]
  jobs = compare_jobs + sweep_jobs + autolora_jobs
  check_jobs(jobs)
  log.info('%d runs in %s: %s', len(jobs), root, ', '.join(j.name for j in jobs))
  done = execute(jobs, runner or _default_runner())
  meta = describe_config(config, config_file, command)
  out = {'comparison': None, 'sensitivity': None}
  if compare_jobs:
    summary = {**meta, 'seeds': seeds, **summarize(_group(done, compare_jobs))}
    paths = write_comparison(summary, root)
    out['comparison'] = summary
    log.info('Comparison written to %s', ', '.join(paths))
  if sweep:
    autolora = {s: r for (g, s), r in done.items() if g == 'autolora'}
    summary = {**meta, 'seeds': seeds, **summarize_sweep(_group(done, sweep_jobs), autolora, lrs, l2s)}
    paths = write_sensitivity(summary, root)
    out['sensitivity'] = summary
    log.info('Sensitivity study written to %s', ', '.join(paths))
  return out


# -- the command -------------------------------------------------------------------------------------------

USAGE = ('Pass --config=NAME (a packaged config, e.g. demo; or a config file path such as configs/NAME.py) '
         'and --workdir=DIR (and --methods=..., --seeds=..., --sweep); see README.md, "Comparing methods and '
         'the sensitivity study".')


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return {
      'config': config_flags.DEFINE_config_file('config', None, 'A packaged config by name (demo, '
                                                'fashion_mnist, ...: autolora_jax/configs/NAME.py), or a '
                                                'config file path.', lock_config=True),
      'workdir': flags.DEFINE_string('workdir', None, 'Folder of the comparison: every run in '
                                     'DIR/<method>/seed<k> (sweep: DIR/sweep/...), and the outputs.'),
      'methods': flags.DEFINE_string('methods', None, 'Comma list of methods to compare (from '
                                     f'{", ".join(steps.METHODS)}); default without --sweep: '
                                     f'{",".join(DEFAULT_METHODS)} (without twins for a ViT).'),
      'seeds': flags.DEFINE_string('seeds', None, 'Comma list of seeds (config.seed); default '
                                   f'{",".join(map(str, DEFAULT_SEEDS))} for the comparison, '
                                   f'{",".join(map(str, SWEEP_SEEDS))} for --sweep alone.'),
      'sweep': flags.DEFINE_bool('sweep', False, 'Run the sensitivity study: vanilla RFT over --sweep_lr x '
                                 '--sweep_l2, beside AutoLoRa.'),
      'sweep_lr': flags.DEFINE_string('sweep_lr', ','.join(map(number_label, SWEEP_LRS)),
                                      'Comma list of config.fixed.lr values for --sweep.'),
      'sweep_l2': flags.DEFINE_string('sweep_l2', ','.join(map(number_label, SWEEP_L2S)),
                                      'Comma list of config.fixed.l2 values (KL weight) for --sweep.'),
  }


def _mark_required():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.mark_flags_as_required(['config', 'workdir'])


def _load_config(holder, config_file: str, fail):
  """The config of --config (ml_collections loads the file on first access): a file that fails to load, or
  a bad override, is a one-paragraph error (exit 2); a missing file was refused before, by
  cli.check_config_file in the flags parser."""
  try:
    config = holder.value
    config.method  # pylint: disable=pointless-statement (a file that failed to load raises here)
    return config
  except (OSError, KeyError, AttributeError, TypeError, ValueError) as e:
    detail = ' '.join(str(e.args[0] if e.args else e).split())
    fail(f'the config file {config_file!r} or a --config override could not be used: {detail}. Every key a '
         'run reads is defined in configs/default.py; check the file and the spelling and type of the '
         'overrides against it.')


def main(argv, flag_values) -> None:
  from autolora_jax import cli, errors, preemption  # pylint: disable=g-import-not-at-top
  from autolora_jax.ops import host  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value.')
  absl_logging.set_verbosity(absl_logging.WARNING)  # libraries: warnings only
  logging.getLogger('autolora_jax').setLevel(logging.INFO)  # this project: progress messages
  host.retain_freed_memory()  # as run.py: see autolora_jax/ops/host.py
  host.set_xla_cpu_flags()
  host.enable_compilation_cache(host.default_compilation_cache_dir())  # as run.py's default
  command = shlex.join(['python', '-m', 'autolora_jax.compare'] + sys.argv[1:])
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  config = _load_config(flag_values['config'], config_file, cli.fail)
  try:
    compare(config, flag_values['workdir'].value,
            method_names=flag_values['methods'].value, seeds=flag_values['seeds'].value,
            sweep=flag_values['sweep'].value, sweep_lrs=flag_values['sweep_lr'].value,
            sweep_l2s=flag_values['sweep_l2'].value, config_file=config_file, command=command)
  except errors.input_errors() as e:
    cli.fail(str(e))
  except errors.NonFiniteLossError as e:
    cli.fail(f'{e}\nRunning the same command again resumes the comparison: {command}', status=1)
  except errors.Preempted as e:
    print(f'{e}\nThe comparison stopped there. Running the same compare command again resumes it (finished '
          f'runs are skipped, the stopped one resumes): {command}', file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)


def run_cli() -> None:
  """`python -m autolora_jax.compare` (and the `autolora-compare` command of the installed package)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import app  # pylint: disable=g-import-not-at-top
  from autolora_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  flag_values = _define_flags()
  _mark_required()
  app.run(lambda argv: main(argv, flag_values), flags_parser=_cli.make_flags_parser(USAGE))


if __name__ == '__main__':
  run_cli()
